"""Data a run cannot use is refused with a DataError that names the file or dataset and the fix.

Damaged or wrong IDX files (value type, record counts, sizes, gzip streams), a dataset smaller
than one batch, sources giving records the pipeline cannot use, and first batches with labels or
pixels out of range. No training.
"""

import gzip
import re

import numpy as np
import pytest

from diffusion_jax import data

REINSTALL = "apt-get install --reinstall dataset-fashion-mnist"
_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
          np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def _idx_bytes(array, shape=None):
    """An IDX file's bytes for ``array`` (big-endian), declaring ``shape`` (default its own)."""
    array = np.asarray(array)
    array = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    shape = array.shape if shape is None else shape
    header = bytes([0, 0, _CODES[array.dtype], len(shape)])
    header += b"".join(int(n).to_bytes(4, "big") for n in shape)
    return header + array.tobytes()


def _write(path, content):
    path = str(path)
    if path.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(content)
    else:
        with open(path, "wb") as f:
            f.write(content)
    return path


def _fashion(tmp_path, images=None, labels=None, suffix=".gz"):
    """A Fashion-MNIST train folder holding ``images`` and ``labels`` (defaults: 20 valid ones)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8) if images is None else images
    labels = (np.arange(20) % 10).astype(np.uint8) if labels is None else labels
    image_file = _write(tmp_path / f"train-images-idx3-ubyte{suffix}", _idx_bytes(images))
    label_file = _write(tmp_path / f"train-labels-idx1-ubyte{suffix}", _idx_bytes(labels))
    return str(tmp_path), image_file, label_file


def test_float_images_are_refused_not_scaled_as_bytes(tmp_path):
    path, image_file, _ = _fashion(tmp_path, images=np.full((20, 28, 28), 0.5, np.float32))
    np.testing.assert_array_equal(data.read_idx(image_file), 0.5)  # the file itself reads fine
    with pytest.raises(data.DataError, match=re.escape(image_file) + " holds 32-bit floats "
                       r"\(IDX type 0x0D\), but Fashion-MNIST images must be unsigned bytes "
                       r"\(IDX type 0x08\).*uint8"):
        data.FashionMNIST("train", path=path)


def test_signed_byte_labels_are_refused(tmp_path):
    path, _, label_file = _fashion(tmp_path, labels=(np.arange(20) % 10).astype(np.int8))
    with pytest.raises(data.DataError, match=re.escape(label_file) + r" holds signed bytes "
                       r"\(IDX type 0x09\), but Fashion-MNIST labels must be unsigned bytes"):
        data.FashionMNIST("train", path=path)


@pytest.mark.parametrize("dtype", [">i2", ">i4", ">f8"])
def test_every_idx_value_type_reads_with_its_own_dtype(tmp_path, dtype):
    values = np.arange(-3, 9).reshape(3, 4).astype(dtype)
    read = data.read_idx(_write(tmp_path / "values.idx", _idx_bytes(values)))
    assert read.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(read, values)


def test_zero_records_are_an_error(tmp_path):
    empty = _write(tmp_path / "empty.gz", _idx_bytes(np.zeros((0, 28, 28), np.uint8)))
    with pytest.raises(data.DataError, match=re.escape(empty) + " holds 0 records.*"
                       + re.escape(REINSTALL)):
        data.read_idx(empty)
    path, _, _ = _fashion(tmp_path, images=np.zeros((0, 28, 28), np.uint8),
                          labels=np.zeros(0, np.uint8))
    with pytest.raises(data.DataError, match="holds 0 records"):
        data.FashionMNIST("train", path=path)
    no_dims = _write(tmp_path / "scalar.idx", bytes([0, 0, 8, 0, 7]))
    with pytest.raises(data.DataError, match="declares no dimensions"):
        data.read_idx(no_dims)


def test_image_and_label_counts_must_agree(tmp_path):
    labels = (np.arange(15) % 10).astype(np.uint8)
    path, image_file, label_file = _fashion(tmp_path, labels=labels)
    with pytest.raises(data.DataError, match=re.escape(image_file) + " holds 20 images but "
                       + re.escape(label_file) + " holds 15 labels.*one download"):
        data.FashionMNIST("train", path=path)


def test_labels_beyond_the_ten_classes_are_refused(tmp_path):
    path, _, label_file = _fashion(tmp_path, labels=np.full(20, 12, np.uint8))
    with pytest.raises(data.DataError, match=re.escape(label_file) + " holds the label 12, but "
                       r"Fashion-MNIST has 10 classes \(labels 0\.\.9\)"):
        data.FashionMNIST("train", path=path)


def test_wrongly_shaped_files_are_refused(tmp_path):
    path, image_file, _ = _fashion(tmp_path, images=np.zeros((20, 784), np.uint8))
    with pytest.raises(data.DataError, match=re.escape(image_file) + r" holds an array of shape "
                       r"\(20, 784\), but Fashion-MNIST images are 3-D"):
        data.FashionMNIST("train", path=path)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_fewer_or_more_bytes_than_the_header_declares(tmp_path, suffix):
    full = _idx_bytes(np.zeros((4, 3, 3), np.uint8))
    short = _write(tmp_path / f"short{suffix}", full[:-5])
    with pytest.raises(data.DataError, match=re.escape(short) + r" holds 31 data bytes but its "
                       r"header declares shape \(4, 3, 3\) of unsigned bytes, 36 bytes: the file "
                       r"is truncated\. Re-download it.*" + re.escape(REINSTALL)):
        data.read_idx(short)
    long = _write(tmp_path / f"long{suffix}", full + b"\x00\x01")
    with pytest.raises(data.DataError, match="extra bytes follow the data"):
        data.read_idx(long)
    header_only = _write(tmp_path / f"header{suffix}", full[:9])
    with pytest.raises(data.DataError, match="truncated inside its header"):
        data.read_idx(header_only)


def test_unknown_type_codes_and_non_idx_files(tmp_path):
    unknown = _write(tmp_path / "unknown.idx", bytes([0, 0, 0x0A, 1, 0, 0, 0, 1, 5]))
    with pytest.raises(data.DataError, match=r"unknown type code 0x0A \(known: 0x08 unsigned "):
        data.read_idx(unknown)
    with pytest.raises(data.DataError, match="not an IDX file"):
        data.read_idx(_write(tmp_path / "zip.idx", b"PK\x03\x04rest"))
    packed = tmp_path / "train-images-idx3-ubyte"
    packed.write_bytes(gzip.compress(_idx_bytes(np.zeros((2, 2), np.uint8))))
    with pytest.raises(data.DataError, match="gzip-compressed but its name does not end in .gz: "
                       "rename it to train-images-idx3-ubyte.gz"):
        data.read_idx(str(packed))
    with pytest.raises(data.DataError, match="damaged gzip stream.*Not a gzipped file"):
        plain = tmp_path / "plain.gz"  # an uncompressed file named .gz
        plain.write_bytes(_idx_bytes(np.zeros((2, 2), np.uint8)))
        data.read_idx(str(plain))


def _compressed():
    """The bytes of a gzip-compressed IDX file of 20 random images (and its plain content)."""
    images = np.random.default_rng(1).integers(0, 4, (20, 8, 8), dtype=np.uint8)
    content = _idx_bytes(images)
    return gzip.compress(content, mtime=0), content


def test_every_flipped_byte_of_a_gzip_stream_is_a_data_error(tmp_path):
    packed, content = _compressed()
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(packed)
    np.testing.assert_array_equal(data.read_idx(str(path)).tobytes(), content[16:])
    # Bytes 4..9 (time stamp, flags of the compressor, OS) carry nothing a reader checks.
    for position in [0, 1, 2, 3] + list(range(10, len(packed))):
        damaged = bytearray(packed)
        damaged[position] ^= 0x5A
        path.write_bytes(bytes(damaged))
        with pytest.raises(data.DataError) as raised:
            data.read_idx(str(path))
        message = str(raised.value)
        assert str(path) in message and ("damaged" in message or "ends early" in message or
                                         "not an IDX" in message), (position, message)
        if "not an IDX" not in message:
            assert REINSTALL in message


def test_a_flipped_byte_reaches_the_user_through_fashion_mnist(tmp_path):
    path, image_file, _ = _fashion(tmp_path)
    with open(image_file, "rb") as f:
        damaged = bytearray(f.read())
    damaged[len(damaged) // 2] ^= 0xFF
    with open(image_file, "wb") as f:
        f.write(bytes(damaged))
    with pytest.raises(data.DataError, match=re.escape(image_file) + " has a damaged gzip "
                       r"stream \((zlib\.error|gzip\.BadGzipFile): .*" + re.escape(REINSTALL)):
        data.FashionMNIST("train", path=path)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.99])
def test_a_truncated_gzip_file_is_a_data_error(tmp_path, keep):
    packed, _ = _compressed()
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(packed[:int(len(packed) * keep)])
    with pytest.raises(data.DataError, match=re.escape(str(path)) + " ends early. Re-download "
                       "it.*" + re.escape(REINSTALL)):
        data.read_idx(str(path))


def test_missing_files_keep_their_message(tmp_path):
    with pytest.raises(data.DataError, match="not found in .*apt-get install dataset-fashion"):
        data.FashionMNIST("train", path=str(tmp_path))
    with pytest.raises(FileNotFoundError):
        data.read_idx(str(tmp_path / "nothing.gz"))


def test_a_dataset_smaller_than_one_batch(tmp_path):
    with pytest.raises(data.DataError, match=r"Toy2D\(kind='mixture', size=10, seed=0\) has 10 "
                       "records, too few for one batch of 16: lower the batch size "
                       r"\(config.data.batch_size.*at most 10, or use more data"):
        data.make_iterator(data.Toy2D(size=10), batch_size=16, seed=0)
    with pytest.raises(data.DataError, match=r"too few for one batch of 24 \(3 processes x 8\)"):
        data.make_iterator(data.Toy2D(size=20), batch_size=8, seed=0, shard_count=3)
    path, _, _ = _fashion(tmp_path)
    with pytest.raises(data.DataError, match=r"FashionMNIST\(num_records=20\) has 20 records"):
        data.make_iterator(data.FashionMNIST("train", path=path), batch_size=32, seed=0)


class _Records:
    """A source of ``count`` copies of one record."""

    def __init__(self, record, count=8):
        self.record, self.count = record, count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        return dict(self.record)

    def __repr__(self):
        return "Records()"


def test_a_source_of_float_images_is_refused_before_any_batch():
    floats = _Records({"image": np.full((8, 8, 3), 0.5, np.float32), "label": np.int32(1)})
    with pytest.raises(data.DataError, match=r"Records\(\): record 0's image is float32 of shape "
                       r"\(8, 8, 3\) in \[0.5, 0.5\], but sources must give uint8 pixels 0\.\.255.*"
                       r"np.round\(image \* 255\).astype\(np.uint8\)"):
        data.make_iterator(floats, batch_size=4, seed=0)
    wide = _Records({"image": np.zeros((8, 8), np.uint16)})
    with pytest.raises(data.DataError, match="image is uint16.*must give uint8"):
        data.check_source(wide, dataset="sixteen-bit scans")


@pytest.mark.parametrize("shape", [(3, 8, 8), (8, 8, 4), (8,), (2, 8, 8, 3)])
def test_images_must_be_hwc_with_one_or_three_channels(shape):
    source = _Records({"image": np.zeros(shape, np.uint8)})
    with pytest.raises(data.DataError, match=re.escape(f"image has shape {shape}") + ".*1 "
                       r"\(grayscale\) or 3 \(RGB\) channels"):
        data.check_source(source, dataset="scans")


def test_other_unusable_records():
    with pytest.raises(data.DataError, match="one integer class index"):
        data.check_source(_Records({"image": np.zeros((8, 8), np.uint8), "label": 1.5}))
    with pytest.raises(data.DataError, match="one integer class index"):
        data.check_source(_Records({"image": np.zeros((8, 8), np.uint8),
                                    "label": np.eye(10)[3]}))
    with pytest.raises(data.DataError, match="must be finite numbers"):
        data.check_source(_Records({"x": np.array([0.0, np.nan], np.float32)}))
    with pytest.raises(data.DataError,
                       match=r"'image' \(uint8 HWC\), 'video'.*'audio'.*or 'x'.*\['pixels'\]"):
        data.check_source(_Records({"pixels": np.zeros((8, 8), np.uint8)}))


def _batch(**changes):
    batch = {"x": np.zeros((4, 8, 8, 1), np.float32), "label": np.arange(4, dtype=np.int32)}
    batch.update(changes)
    return batch


def test_labels_outside_the_classes_are_named():
    data.check_batch(_batch(), num_classes=4, dataset="scans")
    with pytest.raises(data.DataError, match=r"scans: the batch has the label 3, outside \[0, "
                       r"3\); the data has more classes than num_classes=3.*fix the labels"):
        data.check_batch(_batch(), num_classes=3, dataset="scans")
    negative = _batch(label=np.array([0, -1, 2, 1], np.int32))
    with pytest.raises(data.DataError, match="label -1.*class_conditional=False"):
        data.check_batch(negative, num_classes=10, dataset="scans")
    data.check_batch(negative, num_classes=None, dataset="scans")  # unconditional: unused
    with pytest.raises(data.DataError, match="class-conditional.*no 'label'"):
        data.check_batch({"x": np.zeros((4, 8, 8, 1), np.float32)}, num_classes=3,
                         dataset="scans")


def test_images_outside_the_model_range_or_not_finite():
    data.check_batch(_batch(x=np.full((4, 8, 8, 1), 1.0 + 1e-5, np.float32)), num_classes=None,
                     dataset="scans")  # rounding of a scaling
    with pytest.raises(data.DataError, match=r"scans: the batch's images lie in \[-1, 254\], "
                       r"outside the model's \[-1, 1\]: the source gave pixels that are not uint8"):
        data.check_batch(_batch(x=np.linspace(-1, 254, 256, dtype=np.float32).reshape(4, 8, 8, 1)),
                         num_classes=None, dataset="scans")
    poisoned = np.zeros((4, 8, 8, 1), np.float32)
    poisoned[1, 2, 3] = np.nan
    poisoned[2, 2, 3] = np.inf
    with pytest.raises(data.DataError, match="scans: the batch holds 2 NaN or infinite values"):
        data.check_batch(_batch(x=poisoned), num_classes=None, dataset="scans")
    with pytest.raises(data.DataError, match="batch 'x' is float64, expected float32"):
        data.check_batch(_batch(x=np.zeros((4, 8, 8, 1))), num_classes=None, dataset="scans")
    # Vectors keep their own scale (Toy2D's points reach beyond 2).
    data.check_batch({"x": np.full((4, 2), 2.5, np.float32)}, num_classes=None, dataset="toy")


def test_tokens_must_be_int32_with_a_bool_mask():
    tokens, mask = np.zeros((4, 16), np.int32), np.ones((4, 16), bool)
    data.check_batch(_batch(tokens=tokens, token_mask=mask), num_classes=None, dataset="c")
    with pytest.raises(data.DataError, match="'tokens' is int64.*expected int32 and bool"):
        data.check_batch(_batch(tokens=tokens.astype(np.int64), token_mask=mask),
                         num_classes=None, dataset="c")
    with pytest.raises(data.DataError, match="'token_mask' float32"):
        data.check_batch(_batch(tokens=tokens, token_mask=mask.astype(np.float32)),
                         num_classes=None, dataset="c")


def test_real_pipelines_pass_the_first_batch_check(tmp_path):
    path, _, _ = _fashion(tmp_path)
    sources = [data.FashionMNIST("train", path=path), data.Shapes(size=16, resolution=8),
               data.Toy2D(size=16), data.CaptionedShapes(size=16, resolution=16)]
    for source in sources:
        iterator = data.make_iterator(source, batch_size=4, seed=0, max_length=32)
        data.check_batch(next(iterator), num_classes=getattr(source, "num_classes", None),
                         dataset=repr(source))


def test_check_first_batch_checks_once_and_keeps_the_position(tmp_path):
    path, _, _ = _fashion(tmp_path)
    source = data.FashionMNIST("train", path=path)
    plain = data.make_iterator(source, batch_size=4, seed=0)
    checked = data.check_first_batch(data.make_iterator(source, batch_size=4, seed=0),
                                     num_classes=10, dataset="fashion_mnist")
    for _ in range(3):
        a, b = next(plain), next(checked)
        np.testing.assert_array_equal(a["x"], b["x"])
    assert checked.get_state() == plain.get_state()
    checked.set_state(plain.get_state())
    np.testing.assert_array_equal(next(checked)["label"], next(plain)["label"])
    strict = data.check_first_batch(data.make_iterator(source, batch_size=4, seed=0),
                                    num_classes=2, dataset="fashion_mnist (config.data.path=X)")
    with pytest.raises(data.DataError, match=r"fashion_mnist \(config.data.path=X\): the batch "
                       r"has the label \d, outside \[0, 2\)"):
        next(strict)
    next(strict)  # only the first batch is checked
