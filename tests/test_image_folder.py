"""A folder of one's own images as a data source; the resize and centre crop of image sources."""

import json

import numpy as np
import pytest
from PIL import Image

from diffusion_jax import data

RED, BLUE, GREEN = (220, 20, 20), (20, 20, 220), (20, 200, 20)


def _save(path, array, mode=None, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(array, Image.Image):
        image = array
    elif np.asarray(array).dtype == np.uint16:
        image = Image.fromarray(np.asarray(array))
    else:
        image = Image.fromarray(np.asarray(array, np.uint8), mode)
    image.save(path, **kwargs)
    return path


def _split(height, width, left=RED, right=BLUE):
    """An RGB image whose left half is ``left`` and right half ``right``."""
    image = np.empty((height, width, 3), np.uint8)
    image[:, : width // 2], image[:, width // 2:] = left, right
    return image


def _solid(height, width, colour):
    return np.broadcast_to(np.array(colour, np.uint8), (height, width, 3))


@pytest.fixture
def mixed_folder(tmp_path):
    """Images of several sizes, modes and formats, one in a subfolder, plus files to ignore."""
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    _save(folder / "b_rgb.png", rng.integers(0, 256, (30, 40, 3)))
    _save(folder / "a_grey.PNG", rng.integers(0, 256, (50, 20)), "L")
    rgba = np.concatenate([rng.integers(0, 256, (32, 32, 3)), np.zeros((32, 32, 1))], -1)
    rgba[:16, :, 3] = 255  # top half opaque, bottom half transparent
    _save(folder / "c_rgba.png", rgba, "RGBA")
    palette = Image.fromarray(rng.integers(0, 256, (23, 17, 3)).astype(np.uint8)).convert("P")
    _save(folder / "d_palette.png", palette)
    _save(folder / "e_thin.png", rng.integers(0, 256, (40, 1, 3)))
    _save(folder / "sub" / "f_photo.jpg", _split(48, 64), quality=95)
    _save(folder / "g.JPEG", _solid(20, 20, GREEN))
    (folder / "notes.md").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\x00\x01")
    _save(folder / "._b_rgb.png", rng.integers(0, 256, (4, 4, 3)))  # a hidden file
    return folder


def test_records_are_rgb_squares_of_the_resolution_in_sorted_order(mixed_folder):
    source = data.ImageFolder(str(mixed_folder), 16, log=lambda message: None)
    names = [source.file(i).split("images/")[1] for i in range(len(source))]
    assert names == ["a_grey.PNG", "b_rgb.png", "c_rgba.png", "d_palette.png", "e_thin.png",
                     "g.JPEG", "sub/f_photo.jpg"]
    for i in range(len(source)):
        record = source[i]
        assert set(record) == {"image"}
        assert record["image"].shape == (16, 16, 3) and record["image"].dtype == np.uint8
    assert not source.has_captions and not hasattr(source, "num_classes")
    again = data.ImageFolder(str(mixed_folder), 16, log=lambda message: None)
    np.testing.assert_array_equal(source[3]["image"], again[3]["image"])
    grey = source[0]["image"]
    np.testing.assert_array_equal(grey[..., 0], grey[..., 1])  # greyscale expands to RGB
    transparent = source[2]["image"][12:]  # the bottom quarter was fully transparent
    assert transparent.min() == 255  # composited over white
    np.testing.assert_allclose(source[5]["image"], np.broadcast_to(GREEN, (16, 16, 3)), atol=3)
    assert "num_images=7" in repr(source) and "resolution=16" in repr(source)


def test_resize_keeps_the_centre_of_wide_and_tall_images():
    # (bicubic rings a little beside the edge, hence the tolerance)
    wide = data.resize_center_crop(_split(20, 60), 16)  # the crop spans columns 20..40
    assert wide.shape == (16, 16, 3)
    np.testing.assert_allclose(wide[:, :7], np.broadcast_to(RED, (16, 7, 3)), atol=15)
    np.testing.assert_allclose(wide[:, 9:], np.broadcast_to(BLUE, (16, 7, 3)), atol=15)
    np.testing.assert_array_equal(wide[:, :7], wide[:, 9:][:, ::-1, ::-1])  # centred
    tall = np.swapaxes(_split(20, 60), 0, 1)  # top red, bottom blue
    out = data.resize_center_crop(tall, 8)
    np.testing.assert_allclose(out[:3], np.broadcast_to(RED, (3, 8, 3)), atol=15)
    np.testing.assert_allclose(out[5:], np.broadcast_to(BLUE, (3, 8, 3)), atol=15)
    # One resampling of the centre box equals resizing the shorter side, then cropping.
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (32, 64, 3)).astype(np.uint8)
    two_steps = Image.fromarray(image).resize((32, 16), Image.BICUBIC).crop((8, 0, 24, 16))
    np.testing.assert_array_equal(data.resize_center_crop(image, 16), np.asarray(two_steps))


def test_resize_keeps_the_layout_and_refuses_what_is_not_uint8():
    rng = np.random.default_rng(2)
    for shape, expected in (((30, 40), (8, 8)), ((30, 40, 1), (8, 8, 1)),
                            ((30, 40, 3), (8, 8, 3)), ((30, 40, 4), (8, 8, 4)),
                            ((30, 40, 2), (8, 8, 2))):
        out = data.resize_center_crop(rng.integers(0, 256, shape).astype(np.uint8), 8)
        assert out.shape == expected and out.dtype == np.uint8
    same = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
    assert data.resize_center_crop(same, 8) is same
    upsampled = data.resize_center_crop(_solid(1, 3, GREEN), 8)  # 1 pixel tall
    np.testing.assert_array_equal(upsampled, np.broadcast_to(GREEN, (8, 8, 3)))
    with pytest.raises(data.DataError, match="uint8"):
        data.resize_center_crop(np.zeros((8, 8, 3), np.float32), 4)
    with pytest.raises(data.DataError, match="shape"):
        data.resize_center_crop(np.zeros((2, 8, 8, 3), np.uint8), 4)
    with pytest.raises(data.DataError, match="resolution"):
        data.resize_center_crop(same, 0)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees clockwise to view
    _save(tmp_path / "phone.png", _split(20, 40), exif=exif)  # viewed: red above blue
    image = data.ImageFolder(str(tmp_path), 8, log=lambda m: None)[0]["image"]
    np.testing.assert_allclose(image[:3], np.broadcast_to(RED, (3, 8, 3)), atol=15)
    np.testing.assert_allclose(image[5:], np.broadcast_to(BLUE, (3, 8, 3)), atol=15)


def test_sixteen_bit_grey_is_scaled_to_eight_bits(tmp_path):
    _save(tmp_path / "deep.png", np.full((10, 12), 40000, np.uint16))
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    image = data.ImageFolder(str(tmp_path), 4, log=lambda m: None)[0]["image"]
    np.testing.assert_array_equal(image, np.full((4, 4, 3), round(40000 / 257), np.uint8))


def _captioned(folder, names):
    for i, name in enumerate(names):
        _save(folder / name, _solid(12, 10 + i, (10 * i, 0, 0)))


def test_captions_from_metadata_jsonl(tmp_path):
    _captioned(tmp_path, ["x.png", "sub/y.jpg", "z.png"])
    (tmp_path / "z.txt").write_text("ignored: metadata.jsonl comes first")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "z.png", "text": "a zebra", "other": 1}) + "\n\n"
        + json.dumps({"file_name": "./sub/y.jpg", "caption": "a yak"}) + "\n"
        + json.dumps({"file_name": "x.png", "text": "an x"}) + "\n")
    source = data.ImageFolder(str(tmp_path), 8, captions="required")
    assert source.has_captions and "captions=True" in repr(source)
    assert [source[i]["caption"] for i in range(3)] == ["a yak", "an x", "a zebra"]
    assert data.ImageFolder(str(tmp_path), 8, captions="none")[0].keys() == {"image"}


def test_captions_from_text_files_and_images_without_one(tmp_path):
    _captioned(tmp_path, ["a.png", "b.png", "c.png"])
    (tmp_path / "a.txt").write_text("an apple\n")
    (tmp_path / "c.txt").write_text("a cherry")
    logged = []
    source = data.ImageFolder(str(tmp_path), 8, log=logged.append)
    assert [source[i]["caption"] for i in range(3)] == ["an apple", "", "a cherry"]
    assert len(logged) == 1 and "1 of 3 images" in logged[0] and "b.png" in logged[0]
    with pytest.raises(data.DataError, match=r"1 of 3 images .* no caption \(b\.png\).*\.txt"):
        data.ImageFolder(str(tmp_path), 8, captions="required")


@pytest.mark.parametrize("lines, match", [
    (['{"file_name": "a.png", "text": "ok"}', '{"file_name": "b.png", "text": '],
     r"metadata\.jsonl line 2 is not valid JSON"),
    (['["a.png", "text"]'], r"line 1 has no \"file_name\""),
    (['{"file_name": "a.png", "label": 3}'], r"line 1 \(a\.png\) needs its caption .*\"text\""),
    (['{"file_name": "a.png", "text": null}'], r"line 1 \(a\.png\) needs its caption"),
    (['{"file_name": "a.png", "text": "x"}', '{"file_name": "a.png", "text": "y"}'],
     r"line 2 names a\.png again \(line 1"),
    (['{"file_name": "missing.png", "text": "x"}'],
     r"line 1 names missing\.png, which does not exist"),
    (['{"file_name": "notes.md", "text": "x"}'], r"line 1 names notes\.md, which is not an image"),
])
def test_bad_metadata_says_which_line(tmp_path, lines, match):
    _captioned(tmp_path, ["a.png", "b.png"])
    (tmp_path / "notes.md").write_text("hello")
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DataError, match=match):
        data.ImageFolder(str(tmp_path), 8)


def test_missing_and_empty_folders_say_what_to_fix(tmp_path):
    with pytest.raises(data.DataError, match=r"nowhere does not exist"):
        data.ImageFolder(str(tmp_path / "nowhere"), 8)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(data.DataError, match="is a file, not a folder"):
        data.ImageFolder(str(tmp_path / "file.png"), 8)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "captions.txt").write_text("no images here")
    with pytest.raises(data.DataError, match=r"empty holds no image files .*\.png"):
        data.ImageFolder(str(empty), 8)
    with pytest.raises(data.DataError, match=r"have no captions: write metadata\.jsonl"):
        data.ImageFolder(str(_save(tmp_path / "plain" / "a.png", _split(4, 4)).parent), 8,
                         captions="required")
    with pytest.raises(data.DataError, match="captions must be one of"):
        data.ImageFolder(str(tmp_path / "plain"), 8, captions="yes")


def test_unreadable_files_are_skipped_and_counted(tmp_path):
    _captioned(tmp_path, ["good1.png", "good2.jpg", "good3.bmp"])
    (tmp_path / "text.png").write_text("I am not a picture")
    whole = (tmp_path / "good1.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "empty.webp").write_bytes(b"")
    logged = []
    source = data.ImageFolder(str(tmp_path), 8, log=logged.append)
    assert len(source) == 3 and all(source[i]["image"].shape == (8, 8, 3) for i in range(3))
    assert len(logged) == 1
    assert "skipped 3 of 6 files" in logged[0] and str(tmp_path) in logged[0]
    assert "text.png" in logged[0] and "truncated.png" in logged[0]


def test_no_readable_image_is_an_error_naming_the_folder(tmp_path):
    (tmp_path / "a.png").write_text("not a png")
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(data.DataError, match=rf"none of the 2 image files in {tmp_path} is a "
                                              r"readable image .*a\.png"):
        data.ImageFolder(str(tmp_path), 8)


def test_a_file_damaged_past_its_header_is_named_when_read(tmp_path):
    rng = np.random.default_rng(3)
    whole = _save(tmp_path / "photo.jpg", rng.integers(0, 256, (64, 64, 3))).read_bytes()
    (tmp_path / "photo.jpg").write_bytes(whole[: len(whole) * 2 // 3])
    source = data.ImageFolder(str(tmp_path), 8, log=lambda m: None)  # the header reads
    with pytest.raises(data.DataError, match=r"cannot decode the image .*photo\.jpg"):
        source[0]


def test_the_pipeline_reads_a_captioned_folder(tmp_path):
    names = [f"img{i}.png" for i in range(6)]
    _captioned(tmp_path, names)
    for name in names:
        (tmp_path / name.replace(".png", ".txt")).write_text(f"picture {name}")
    source = data.ImageFolder(str(tmp_path), 8)
    data.check_source(source)
    iterator = data.make_iterator(source, batch_size=4, max_length=16, seed=0,
                                  shard_index=0, shard_count=1)
    batch = next(iterator)
    assert batch["x"].shape == (4, 8, 8, 3) and batch["x"].dtype == np.float32
    assert -1.0 <= batch["x"].min() and batch["x"].max() <= 1.0
    assert batch["tokens"].shape == (4, 16) and batch["token_mask"].dtype == np.bool_
    data.check_batch(batch, num_classes=None, dataset=repr(source))
    plain = data.make_iterator(data.ImageFolder(str(tmp_path), 8, captions="none"),
                               batch_size=4, seed=0)
    assert set(next(plain)) == {"x"}


class _Labelled:
    """Images of several sizes with labels, in memory; ``read_batch`` when ``batched``."""

    num_classes = 3

    def __init__(self, batched):
        rng = np.random.default_rng(4)
        self.images = rng.integers(0, 256, (8, 24, 40, 3)).astype(np.uint8)
        if batched:
            self.read_batch = lambda keys: {"image": self.images[keys],
                                            "label": (np.asarray(keys) % 3).astype(np.int32)}

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"image": self.images[index], "label": np.int32(index % 3)}

    def __repr__(self):
        return "_Labelled()"


def test_resized_wraps_any_image_source():
    inner = _Labelled(batched=False)
    source = data.Resized(inner, 16)
    assert len(source) == 8 and source.num_classes == 3
    assert repr(source) == "Resized(_Labelled(), resolution=16)"
    assert not hasattr(source, "read_batch")
    record = source[5]
    assert record["image"].shape == (16, 16, 3) and record["label"] == 2
    np.testing.assert_array_equal(record["image"],
                                  data.resize_center_crop(inner.images[5], 16))
    data.check_source(source)
    batched = data.Resized(_Labelled(batched=True), 16)
    assert hasattr(batched, "read_batch")
    one = next(data.make_iterator(source, batch_size=4, seed=0))
    other = next(data.make_iterator(batched, batch_size=4, seed=0))
    for key in ("x", "label"):
        np.testing.assert_array_equal(one[key], other[key])
    assert one["x"].shape == (4, 16, 16, 3)
    with pytest.raises(data.DataError, match="needs records with an 'image'"):
        data.Resized(data.Toy2D(size=4), 8)[0]


def test_a_captioned_folder_config_builds_a_text_model(tmp_path):
    """data.name='folder' with captions trains a text-conditioned model, as captioned shapes do."""
    from configs import tiny
    from diffusion_jax import configuration, models, run

    for i in range(8):
        _save(tmp_path / f"{i}.png", _solid(20 + i, 24, (10 * i, 0, 0)))
        (tmp_path / f"{i}.txt").write_text(f"picture {i}")
    config = tiny.get_config()
    config.data.name, config.data.path, config.data.captions = "folder", str(tmp_path), "auto"
    config.data.class_conditional = False
    source, model, shape, classes, _ = run.build(config)
    assert shape == (16, 16, 3) and classes is None and source[3]["caption"] == "picture 3"
    assert isinstance(model, models.TextConditioned) and configuration.is_text_model(config)
    config.data.captions = "none"
    assert not isinstance(run.build(config)[1], models.TextConditioned)
    config.data.path = ""
    with pytest.raises(configuration.ConfigError, match="must name the image folder"):
        run.build(config)
