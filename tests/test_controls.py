"""ControlNet's control maps (data.controls), the renderers' geometry, and adherence metrics."""

import hashlib
import pickle
import sys

import numpy as np
import pytest
from scipy import ndimage

from diffusion_jax import control_eval
from diffusion_jax.data import (CaptionedShapes, Shapes, ToModelInputs, check_batch,
                                check_source, controls, make_iterator)
from diffusion_jax.data.captions import ATTRIBUTE_KEYS, PALETTE
from diffusion_jax.data.sources import DEPTH_FLOOR, DataError

pytest.importorskip("skimage")  # the "control" extra: pip install -e '.[control]'

# sha256 prefixes of records 0..299, computed with the renderers as they were before they could
# give their geometry (images, captions and attributes; Shapes's images and labels). Giving
# geometry must not change a single record.
RECORD_DIGESTS = [
    (dict(resolution=32), "2a170e6bbab12faa"),
    (dict(resolution=16, split="heldout", max_objects=4), "6f5da2b168338e75"),
    (dict(resolution=64, seed=3, split="all", heldout="yellow"), "81dd18a4eceaa426"),
    (dict(resolution=24, split="train", heldout="triangle", max_objects=2), "bebf2f15f9e0c2c5"),
]
SHAPES_DIGEST = "dabd51f8ea80e097"
RENDER_DIGEST = "5d6ed8818e2b199b"  # CaptionedShapes.render of 50 attribute sets, seeds 0..49


def _digest(dataset, count):
    digest = hashlib.sha256()
    for i in range(count):
        record = dataset[i]
        digest.update(np.ascontiguousarray(record["image"]).tobytes())
        if "caption" in record:
            digest.update(record["caption"].encode())
            digest.update(np.array([record["attributes"][k] for k in ATTRIBUTE_KEYS],
                                   np.int32).tobytes())
        else:
            digest.update(np.int32(record["label"]).tobytes())
    return digest.hexdigest()[:16]


@pytest.mark.parametrize("kwargs, expected", RECORD_DIGESTS)
def test_records_are_unchanged_by_geometry(kwargs, expected):
    assert _digest(CaptionedShapes(size=1000, **kwargs), 300) == expected


def test_shapes_and_render_are_unchanged_by_geometry():
    assert _digest(Shapes(size=1000, resolution=32), 300) == SHAPES_DIGEST
    dataset = CaptionedShapes(resolution=32)
    digest = hashlib.sha256()
    for seed in range(50):
        attributes = {"shape": seed % 3, "colour": 1, "size": seed % 2,
                      "count": 1 + seed % 3, "background": 5}
        digest.update(dataset.render(attributes, seed).tobytes())
    assert digest.hexdigest()[:16] == RENDER_DIGEST


def _boundary(mask):
    """Pixels on either side of a mask's edge (4-neighbours of the other kind)."""
    return ((mask & ~ndimage.binary_erosion(mask, border_value=1))
            | (~mask & ndimage.binary_dilation(mask)))


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_geometry_is_exact(resolution):
    dataset = CaptionedShapes(size=100, resolution=resolution, max_objects=4)
    for i in range(40):
        record, geometry = dataset[i], dataset.geometry(i)
        mask, depth = geometry["mask"], geometry["depth"]
        assert mask.dtype == np.bool_ and mask.shape == (resolution, resolution)
        assert depth.dtype == np.float32 and depth.shape == mask.shape
        colour = PALETTE[int(record["attributes"]["colour"])]
        np.testing.assert_array_equal(mask, (record["image"] == colour).all(-1))
        assert np.all(depth[~mask] == 0)
        assert np.all(depth[mask] >= DEPTH_FLOOR) and depth.max() <= 1.0
        assert len(np.unique(depth[mask])) > 1  # a dome, not the mask again
    big = CaptionedShapes(size=10, resolution=64)
    for i in range(10):
        depth = big.geometry(i)["depth"]
        assert depth.max() > 0.9  # near 1 at an object's centre


def test_render_with_geometry_matches_the_record():
    dataset = CaptionedShapes(size=50, resolution=32)
    for i in range(20):
        rng = np.random.default_rng([dataset.seed, i, 0])  # split "train"
        attributes = dataset.sample_attributes(rng)
        image, geometry = dataset.render(attributes, rng, with_geometry=True)
        np.testing.assert_array_equal(image, dataset[i]["image"])
        np.testing.assert_array_equal(geometry["depth"], dataset.geometry(i)["depth"])
    with pytest.raises(IndexError, match="out of range"):
        dataset.geometry(50)


def test_shapes_geometry():
    dataset = Shapes(size=50, resolution=32)
    for i in range(30):
        image, geometry = dataset[i]["image"], dataset.geometry(i)
        background = image[0, 0] if not geometry["mask"][0, 0] else image[-1, -1]
        np.testing.assert_array_equal(geometry["mask"], (image != background).any(-1))
        depth = geometry["depth"]
        assert np.all(depth[~geometry["mask"]] == 0)
        assert np.all(depth[geometry["mask"]] >= DEPTH_FLOOR) and depth.max() <= 1


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_canny_outlines_the_objects(resolution):
    """Edges lie on the objects' boundaries (a pixel either side of the edge) or within one
    pixel of them, and cover them: each boundary pixel has an edge within one pixel.

    Seen on 300 records of up to 4 objects: every edge within a pixel of a boundary; on it at
    32 and 64 pixels all but one stray pixel between two close objects, at 16 pixels 97.7%
    (smoothing moves the outlines of the smallest objects); 99.4% or more of the boundary
    covered (the image's outermost pixels never hold an edge)."""
    dataset = CaptionedShapes(size=100, resolution=resolution, max_objects=4)
    near = np.ones((3, 3), bool)
    covered, on_boundary, total = [], 0, 0
    for i in range(30):
        record, mask = dataset[i], dataset.geometry(i)["mask"]
        edge_map = controls.canny(record["image"])
        assert edge_map.shape == (resolution, resolution, 3) and edge_map.dtype == np.uint8
        assert set(np.unique(edge_map)) <= {0, 255}
        assert (edge_map == edge_map[..., :1]).all()
        edges, boundary = edge_map[..., 0] > 0, _boundary(mask)
        assert not (edges & ~ndimage.binary_dilation(boundary, near)).any(), i
        on_boundary, total = on_boundary + (edges & boundary).sum(), total + edges.sum()
        covered.append(np.mean(ndimage.binary_dilation(edges, near)[boundary]))
    assert on_boundary / total > (0.9 if resolution == 16 else 0.99)
    assert min(covered) > 0.75 and np.mean(covered) > 0.95, covered


def test_canny_sees_colours_of_equal_luminance():
    """Red on blue, whose luminances differ by ~1%: grayscale Canny sees nothing; ours outlines
    the square with a line one pixel wide."""
    from skimage import color, feature

    image = np.broadcast_to(PALETTE[2], (32, 32, 3)).copy()  # blue
    image[8:24, 8:24] = PALETTE[0]  # red
    assert not feature.canny(color.rgb2gray(image), sigma=controls.CANNY_SIGMA,
                             low_threshold=controls.CANNY_LOW_THRESHOLD,
                             high_threshold=controls.CANNY_HIGH_THRESHOLD).any()
    edges = controls.canny(image)[..., 0] > 0
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    near = np.ones((3, 3), bool)
    assert not (edges & ~_boundary(mask)).any()
    assert ndimage.binary_dilation(edges, near)[_boundary(mask)].all()
    assert not (edges[:-1, :-1] & edges[1:, :-1] & edges[:-1, 1:] & edges[1:, 1:]).any()


def test_canny_inputs():
    flat = np.full((16, 16), 120, np.uint8)
    assert not controls.canny(flat).any()
    square = np.zeros((16, 16), np.float32)
    square[4:12, 4:12] = 1.0
    out = controls.canny(square)
    np.testing.assert_array_equal(out, controls.canny(square[..., None]))
    np.testing.assert_array_equal(out, controls.canny((square * 255).astype(np.uint8)))
    assert out.any()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        controls.canny(square * 2 - 1)
    with pytest.raises(ValueError, match="alpha"):
        controls.canny(np.zeros((16, 16, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        controls.canny(np.zeros((16, 16), np.int64))


def test_a_missing_scikit_image_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[control\]'"):
        controls.canny(np.zeros((16, 16), np.uint8))


def test_control_map_kinds_and_errors():
    dataset = CaptionedShapes(size=10, resolution=32)
    image, geometry = dataset[3]["image"], dataset.geometry(3)
    mask = controls.control_map("mask", image, geometry)
    assert mask.dtype == np.uint8 and mask.shape == (32, 32, 3)
    np.testing.assert_array_equal(mask[..., 1], np.where(geometry["mask"], 255, 0))
    depth = controls.control_map("depth", image, geometry)
    np.testing.assert_array_equal(depth[..., 2] > 0, geometry["mask"])
    assert depth.max() > 200 and len(np.unique(depth)) > 3
    np.testing.assert_array_equal(controls.control_map("canny", image), controls.canny(image))
    with pytest.raises(ValueError, match=r"unknown control type 'pose'.*\('canny', 'mask', "
                                         r"'depth'\)"):
        controls.control_map("pose", image)
    for kind in ("mask", "depth"):
        with pytest.raises(ValueError, match=f"control '{kind}'.*CaptionedShapes.*Shapes.*"
                                             "canny"):
            controls.control_map(kind, image)
    with pytest.raises(ValueError, match="geometry of this image"):
        controls.control_map("mask", image[:16], geometry)


class _Arrays:
    """A source of array rows with read_batch, like FashionMNIST (no geometry)."""

    num_classes = 2

    def __init__(self):
        self.images = np.stack([CaptionedShapes(size=8, resolution=16)[i]["image"]
                                for i in range(8)])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"image": self.images[index], "label": np.int32(index % 2)}

    def read_batch(self, indices):
        return {"image": self.images[indices], "label": (np.asarray(indices) % 2).astype(
            np.int32)}

    def __repr__(self):
        return "_Arrays()"


def test_with_control_records():
    source = CaptionedShapes(size=20, resolution=16)
    for kind in controls.CONTROL_TYPES:
        wrapped = controls.WithControl(source, kind)
        assert len(wrapped) == 20 and repr(wrapped) == f"WithControl({source!r}, kind={kind!r})"
        record = wrapped[5]
        assert set(record) == {"image", "caption", "attributes", "control"}
        np.testing.assert_array_equal(record["image"], source[5]["image"])
        assert record["caption"] == source[5]["caption"]
        assert record["control"].dtype == np.uint8 and record["control"].shape == (16, 16, 3)
        np.testing.assert_array_equal(record["control"], wrapped[5]["control"])  # deterministic
        np.testing.assert_array_equal(
            record["control"], controls.control_map(kind, source[5]["image"],
                                                    source.geometry(5)))
        assert not hasattr(wrapped, "read_batch")  # captions are mapped record by record
    shapes = controls.WithControl(Shapes(size=10, resolution=16), "depth")
    assert shapes.num_classes == 3 and shapes.CLASSES == Shapes.CLASSES
    assert shapes[2]["control"].shape == (16, 16, 3) and shapes[2]["label"] == shapes.source[2][
        "label"]
    again = pickle.loads(pickle.dumps(shapes))  # grain's worker processes pickle sources
    np.testing.assert_array_equal(again[4]["control"], shapes[4]["control"])


def test_with_control_refusals():
    with pytest.raises(ValueError, match=r"unknown control type 'edges'.*'canny', 'mask'"):
        controls.WithControl(CaptionedShapes(size=4), "edges")
    for kind in ("mask", "depth"):
        with pytest.raises(ValueError, match=rf"control '{kind}'.*captions.*shapes.*_Arrays\(\) "
                                             "gives no geometry.*'canny'"):
            controls.WithControl(_Arrays(), kind)


def test_with_control_needs_images():
    from diffusion_jax.data import Toy2D

    with pytest.raises(DataError, match="computes control maps from images; record 0 has "
                                        r"\['label', 'x'\]"):
        controls.WithControl(Toy2D(size=4), "canny")[0]


def test_with_control_reads_batches_like_records():
    source = controls.WithControl(_Arrays(), "canny")
    assert source.num_classes == 2
    indices = np.array([3, 0, 7])
    batch = source.read_batch(indices)
    for row, index in enumerate(indices):
        np.testing.assert_array_equal(batch["control"][row], source[index]["control"])
    assert batch["control"].dtype == np.uint8 and batch["control"].shape == (3, 16, 16, 3)
    transform = ToModelInputs()
    mapped = transform.map_batch(batch)
    np.testing.assert_array_equal(mapped["control"], np.stack(
        [transform.map(source[i])["control"] for i in indices]))


def test_model_inputs_carry_the_control_in_unit_range():
    source = controls.WithControl(CaptionedShapes(size=16, resolution=16), "mask")
    check_source(source)
    out = ToModelInputs().map(source[1])
    assert out["control"].dtype == np.float32 and out["control"].shape == (16, 16, 3)
    assert set(np.unique(out["control"])) == {0.0, 1.0}
    assert out["x"].min() >= -1 and "tokens" in out
    batch = next(make_iterator(source, batch_size=4, seed=0))
    assert batch["control"].shape == (4, 16, 16, 3) and batch["control"].dtype == np.float32
    check_batch(batch, num_classes=None, dataset="shapes")
    arrays = next(make_iterator(controls.WithControl(_Arrays(), "canny"), batch_size=4, seed=0))
    assert arrays["control"].shape == (4, 16, 16, 3) and arrays["control"].max() == 1.0
    with pytest.raises(DataError, match="control.*outside|float32 in \\[0, 1\\]"):
        check_batch({**batch, "control": batch["control"] * 2}, num_classes=None, dataset="s")


def test_a_bad_control_is_refused_before_training():
    class Bad(_Arrays):
        def __getitem__(self, index):
            return {**super().__getitem__(index), "control": np.zeros((8, 8, 3), np.uint8)}

    with pytest.raises(DataError, match=r"control is uint8 of shape \(8, 8, 3\).*uint8 "
                                        r"\[16, 16, 3\]"):
        check_source(Bad())
    with pytest.raises(DataError, match="control maps must be uint8"):
        ToModelInputs().map({"image": np.zeros((4, 4, 3), np.uint8),
                             "control": np.zeros((4, 4, 3), np.float32)})


def _real(resolution=32, count=48, max_objects=3):
    dataset = CaptionedShapes(size=count, resolution=resolution, max_objects=max_objects)
    records = [dataset[i] for i in range(count)]
    images = np.stack([r["image"] for r in records])
    masks = np.stack([dataset.geometry(i)["mask"] for i in range(count)])
    backgrounds = np.array([int(r["attributes"]["background"]) for r in records])
    return dataset, images, masks, backgrounds


def test_object_mask_is_exact_on_the_renderer():
    _, images, masks, backgrounds = _real()
    np.testing.assert_array_equal(control_eval.object_mask(images), masks)
    unit = images.astype(np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(control_eval.object_mask(unit, backgrounds), masks)
    # Small perturbations (a generated image's) still classify to the same colours.
    noisy = np.clip(unit + 0.05 * np.random.default_rng(0).standard_normal(unit.shape), -1, 1)
    np.testing.assert_array_equal(control_eval.object_mask(noisy), masks)
    with pytest.raises(ValueError, match="batch of RGB images"):
        control_eval.object_mask(images[0])
    with pytest.raises(ValueError, match="palette indices"):
        control_eval.object_mask(images, 9)


def test_mask_iou_and_edge_f1_by_hand():
    a = np.zeros((3, 8, 8), bool)
    b = np.zeros((3, 8, 8), bool)
    a[0, 2:6, 2:6] = True
    b[0, 2:6, 4:8] = True  # half of each square overlaps: 8 / 24
    a[1, 1, 1] = True  # against nothing
    np.testing.assert_allclose(control_eval.mask_iou(a, b), [8 / 24, 0.0, 1.0])
    edges = np.zeros((2, 10, 10), bool)
    edges[:, 5, 2:8] = True
    shifted = np.roll(edges, 1, axis=1)  # one pixel down
    np.testing.assert_allclose(control_eval.edge_f1(shifted, edges, tolerance=1), [1.0, 1.0])
    np.testing.assert_allclose(control_eval.edge_f1(shifted, edges, tolerance=0), [0.0, 0.0])
    far = np.roll(edges, 3, axis=1)
    np.testing.assert_allclose(control_eval.edge_f1(far, edges, tolerance=2), [0.0, 0.0])
    np.testing.assert_allclose(control_eval.edge_f1(far, edges, tolerance=3), [1.0, 1.0])
    half = edges.copy()
    half[:, 5, 5:8] = False  # precision 1, recall 1/2 (tolerance 0)
    np.testing.assert_allclose(control_eval.edge_f1(half, edges, tolerance=0), 2 / 3)
    empty = np.zeros_like(edges)
    np.testing.assert_allclose(control_eval.edge_f1(empty, empty), [1.0, 1.0])
    np.testing.assert_allclose(control_eval.edge_f1(empty, edges), [0.0, 0.0])
    np.testing.assert_allclose(control_eval.edge_f1(edges, empty), [0.0, 0.0])
    with pytest.raises(ValueError, match="one shape"):
        control_eval.mask_iou(a, b[:, :4])
    with pytest.raises(ValueError, match="whole number"):
        control_eval.edge_f1(edges, edges, tolerance=-1)


@pytest.mark.parametrize("kind", controls.CONTROL_TYPES)
def test_adherence_of_real_images(kind):
    """Real images against their own controls are perfect; against another record's control
    (shifted by one) they are not. Seen at 32 pixels on 48 records: own 1.0 and 1.0 for every
    kind; shuffled mask IoU about 0.1 and edge F1 about 0.2."""
    dataset, images, _, _ = _real()
    source = controls.WithControl(dataset, kind)
    maps = np.stack([source[i]["control"] for i in range(len(images))])
    generated = images.astype(np.float32) / 127.5 - 1.0
    own = control_eval.adherence(generated, maps.astype(np.float32) / 255.0, kind)
    assert set(own) == {"mask_iou", "edge_f1"}
    assert own["mask_iou"] == 1.0 and own["edge_f1"] > 0.99, own
    assert control_eval.adherence(images, maps, kind) == own  # uint8 in, the same
    other = control_eval.adherence(generated, np.roll(maps, 1, axis=0), kind)
    assert other["mask_iou"] < 0.3 and other["edge_f1"] < 0.5, other


def test_adherence_errors():
    _, images, _, _ = _real(count=4)
    maps = np.zeros_like(images)
    with pytest.raises(ValueError, match="unknown control type 'pose'"):
        control_eval.adherence(images, maps, "pose")
    with pytest.raises(ValueError, match="one control map per image"):
        control_eval.adherence(images, maps[:3], "mask")
    with pytest.raises(ValueError, match=r"uint8 or floats in \[0, 1\]"):
        control_eval.adherence(images, maps.astype(np.float32) - 1, "mask")
