"""The procedural captioned-shapes dataset for text-to-image models."""

import re
import time

import numpy as np
import pytest

from diffusion_jax.data import CaptionedShapes, DataError, caption_for

DS = CaptionedShapes
NUMBER_WORDS = {1: "a", 2: "two", 3: "three"}


def _records(dataset, count, start=0):
    return [dataset[i] for i in range(start, start + count)]


def _object_mask(record):
    colour = DS.PALETTE[int(record["attributes"]["colour"])]
    return (record["image"] == colour).all(-1)


def _components(mask):
    """Number of 8-connected components of a boolean image (a small flood fill)."""
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if (0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx]
                            and not seen[ny, nx]):
                        seen[ny, nx] = True
                        stack.append((ny, nx))
    return count


def test_records_are_deterministic_and_batch():
    dataset = CaptionedShapes(size=100, seed=3)
    first, again = dataset[7], CaptionedShapes(size=100, seed=3)[7]
    np.testing.assert_array_equal(first["image"], again["image"])
    assert first["caption"] == again["caption"] and first["attributes"] == again["attributes"]
    other_seed = CaptionedShapes(size=100, seed=4)[7]
    assert not np.array_equal(first["image"], other_seed["image"])
    assert dataset[-1]["caption"] == dataset[99]["caption"]
    with pytest.raises(IndexError):
        dataset[100]
    for resolution in (16, 32, 64, 48):
        records = _records(CaptionedShapes(resolution=resolution), 64)
        images = np.stack([r["image"] for r in records])
        assert images.shape == (64, resolution, resolution, 3) and images.dtype == np.uint8
        for key in DS.ATTRIBUTE_KEYS:
            values = np.stack([r["attributes"][key] for r in records])
            assert values.shape == (64,) and values.dtype == np.int32, key
        assert sorted(records[0]["attributes"]) == sorted(DS.ATTRIBUTE_KEYS)
    assert len(CaptionedShapes(size=123)) == 123


def test_bad_arguments_raise():
    with pytest.raises(DataError, match="split"):
        CaptionedShapes(split="test")
    with pytest.raises(DataError, match="resolution"):
        CaptionedShapes(resolution=8)
    with pytest.raises(DataError, match="max_objects"):
        CaptionedShapes(max_objects=5)


def test_attribute_ranges_and_distribution():
    records = _records(CaptionedShapes(), 1000)
    attrs = {k: np.array([r["attributes"][k] for r in records]) for k in DS.ATTRIBUTE_KEYS}
    assert set(attrs["shape"]) == {0, 1, 2} and set(attrs["size"]) == {0, 1}
    assert set(attrs["colour"]) == set(range(len(DS.COLOURS)))
    assert set(attrs["background"]) == set(range(len(DS.COLOURS)))
    assert set(attrs["count"]) == {1, 2, 3}
    assert (attrs["colour"] != attrs["background"]).all()
    single = attrs["count"] == 1
    assert set(attrs["position"][single]) == set(range(9))
    assert (attrs["position"][~single] == -1).all()
    single_only = _records(CaptionedShapes(max_objects=1), 50)
    assert {int(r["attributes"]["count"]) for r in single_only} == {1}


def _position_in(caption):
    # Longest name first, so "top left" is not read as "top" or "left".
    for name in sorted(DS.POSITIONS, key=len, reverse=True):
        if re.search(rf"\b{name}\b", caption):
            return DS.POSITIONS.index(name)
    return -1


def test_captions_name_every_attribute():
    records = _records(CaptionedShapes(), 400)
    phrasings = set()
    for r in records:
        a = {k: int(v) for k, v in r["attributes"].items()}
        caption = r["caption"]
        count = a["count"]
        shape = DS.SHAPES[a["shape"]] + ("s" if count > 1 else "")
        noun = f"{NUMBER_WORDS[count]} {DS.SIZES[a['size']]} {DS.COLOURS[a['colour']]} {shape}"
        assert re.search(rf"\b{noun}\b", caption), (noun, caption)
        assert re.search(rf"\b{DS.COLOURS[a['background']]}\b", caption.replace(noun, "")), caption
        assert _position_in(caption.replace(noun, "")) == a["position"], caption
        skeleton = caption.replace(noun, "<obj>").replace(DS.COLOURS[a["background"]], "<bg>")
        if a["position"] >= 0:
            skeleton = skeleton.replace(DS.POSITIONS[a["position"]], "<pos>")
        phrasings.add(skeleton)
    assert len(phrasings) >= 20  # templates times position phrasings
    assert caption_for(records[0]["attributes"], 5) == caption_for(records[0]["attributes"], 5)


@pytest.mark.parametrize("concept", ["yellow", "triangle"])
def test_heldout_concept_split(concept):
    """A held-out colour or shape: "train" never shows it (a colour is not even named as the
    background), "heldout" always does, "all" holds both."""
    def records(split, count):
        return _records(CaptionedShapes(split=split, heldout=concept), count)

    def shown(record):
        a = record["attributes"]
        return concept in (DS.COLOURS[int(a["colour"])], DS.SHAPES[int(a["shape"])])

    train = records("train", 1500)
    assert not any(shown(r) for r in train)
    if concept in DS.COLOURS:
        assert not any(concept in r["caption"] for r in train)
        assert not any(DS.COLOURS[int(r["attributes"]["background"])] == concept for r in train)
        # The other colours are still backgrounds and objects.
        assert len({int(r["attributes"]["background"]) for r in train}) == len(DS.COLOURS) - 1
    heldout = records("heldout", 300)
    assert all(shown(r) and concept in r["caption"] for r in heldout)
    everything = [shown(r) for r in records("all", 300)]
    assert any(everything) and not all(everything)
    dataset = CaptionedShapes(heldout=concept)
    assert all(concept in (DS.COLOURS[c], DS.SHAPES[s]) for s, c in dataset.heldout_pairs)
    assert len(dataset.heldout_pairs) == (3 if concept in DS.COLOURS else 6)
    with pytest.raises(DataError, match="heldout must be 'pairs', a colour"):
        CaptionedShapes(heldout="purple")


def test_heldout_pairs_split():
    held = set(DS.HELDOUT_PAIRS)
    assert 3 <= len(held) <= 4

    def pairs(split, count):
        dataset = CaptionedShapes(split=split)
        return [(int(r["attributes"]["shape"]), int(r["attributes"]["colour"]))
                for r in _records(dataset, count)]

    train = pairs("train", 2000)
    assert not held & set(train)
    assert len(set(train)) == len(DS.SHAPES) * len(DS.COLOURS) - len(held)
    heldout = pairs("heldout", 300)
    assert set(heldout) == held
    everything = set(pairs("all", 1000))
    assert held < everything and len(everything) == len(DS.SHAPES) * len(DS.COLOURS)
    dataset = CaptionedShapes()
    assert all(dataset.is_heldout(*p) for p in held) and not dataset.is_heldout(0, 0)
    assert set(dataset.heldout_pairs) == held
    # Held-out captions still describe the pair.
    record = CaptionedShapes(split="heldout")[0]
    a = record["attributes"]
    assert DS.COLOURS[int(a["colour"])] in record["caption"]
    assert DS.SHAPES[int(a["shape"])] in record["caption"]


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_images_show_the_attributes(resolution):
    dataset = CaptionedShapes(resolution=resolution)
    cell = resolution / 3
    areas = {}
    for r in _records(dataset, 300):
        a = {k: int(v) for k, v in r["attributes"].items()}
        image = r["image"]
        obj = _object_mask(r)
        background = (image == DS.PALETTE[a["background"]]).all(-1)
        assert (obj | background).all()  # only two colours, exactly from the palette
        assert obj.sum() > 0
        if a["count"] == 1:
            ys, xs = np.nonzero(obj)
            row, col = divmod(a["position"], 3)
            assert int(ys.mean() // cell) == row and int(xs.mean() // cell) == col, a
            areas.setdefault(a["shape"], {}).setdefault(a["size"], []).append(obj.sum())
        if resolution >= 32:  # separated objects: one blob per object
            assert _components(obj) == a["count"], a
    for shape, by_size in areas.items():  # every large object covers more than any small one
        assert min(by_size[1]) > max(by_size[0]), (DS.SHAPES[shape], by_size)


def test_render_from_attributes():
    dataset = CaptionedShapes(resolution=32)
    # A held-out pair, as evaluation asks for it: "a large green triangle in the center".
    attributes = {"shape": 2, "colour": 1, "size": 1, "count": 1, "position": 4, "background": 5}
    image = dataset.render(attributes, 0)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, dataset.render(attributes, 0))
    obj = (image == DS.PALETTE[1]).all(-1)
    ys, xs = np.nonzero(obj)
    assert 32 / 3 <= ys.mean() < 64 / 3 and 32 / 3 <= xs.mean() < 64 / 3
    assert "large green triangle" in caption_for(attributes, 0)
    # Position and count may be left open.
    several = dataset.render({"shape": 0, "colour": 4, "size": 0, "count": 3, "background": 0},
                             np.random.default_rng(1))
    assert _components((several == DS.PALETTE[4]).all(-1)) == 3
    assert (dataset.render({"shape": 1, "colour": 2, "size": 0, "background": 3}, 2)
            == DS.PALETTE[2]).all(-1).any()
    with pytest.raises(ValueError, match="background"):
        dataset.render({**attributes, "background": 1})


def test_generation_is_fast():
    dataset = CaptionedShapes(resolution=32)
    dataset[0]
    start = time.perf_counter()
    for i in range(500):
        dataset[i]
    per_record = (time.perf_counter() - start) / 500
    assert per_record < 2e-3, f"{per_record * 1e3:.2f} ms per 32x32 record"
