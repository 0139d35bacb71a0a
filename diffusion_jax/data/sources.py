"""Random-access data sources: Fashion-MNIST from IDX files, TFDS datasets, procedural data.

A source has ``len(source)`` and ``source[i] -> dict`` of numpy values (``image`` uint8 HWC or
``x`` float32 vectors, and ``label`` where the data has classes), which is what grain's
``DataLoader`` reads; a source held as arrays also has ``read_batch(indices)``, the same records
with a leading batch axis, which the input pipeline uses to read a batch at once.

Nothing here downloads anything: files come from the Debian package ``dataset-fashion-mnist``,
from a path the user gives, or from a TFDS ``data_dir`` prepared beforehand; procedural datasets
are generated from their index and seed.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from typing import Optional

import numpy as np

__all__ = [
    "DataError",
    "read_idx",
    "FashionMNIST",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DEFAULT_PATH",
    "TFDSSource",
    "Toy2D",
    "Shapes",
    "DEPTH_FLOOR",
    "dome_depth",
]

FASHION_MNIST_DEFAULT_PATH = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# IDX type codes: (what the file calls its values, numpy dtype of one value, big-endian).
_IDX_TYPES = {
    0x08: ("unsigned bytes", np.dtype(np.uint8)),
    0x09: ("signed bytes", np.dtype(np.int8)),
    0x0B: ("16-bit integers", np.dtype(">i2")),
    0x0C: ("32-bit integers", np.dtype(">i4")),
    0x0D: ("32-bit floats", np.dtype(">f4")),
    0x0E: ("64-bit floats", np.dtype(">f8")),
}
_REINSTALL = ("Re-download it, or for the files of Debian's package reinstall them with "
              "`apt-get install --reinstall dataset-fashion-mnist`.")


class DataError(ValueError):
    """A dataset is missing or unreadable; the message says what to do."""


def _idx_type_name(code: int) -> str:
    return f"{_IDX_TYPES[code][0]} (IDX type 0x{code:02X})"


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format; gzip-compressed when the name ends in .gz).

    Header: two zero bytes, a type code (0x08 unsigned byte, 0x09 signed byte, 0x0B 16-bit,
    0x0C 32-bit integer, 0x0D float, 0x0E double), the number of dimensions, then one
    big-endian uint32 per dimension; the values follow, big-endian. The array has the file's own
    value type. A missing file raises ``FileNotFoundError``; a damaged one (bad gzip stream,
    header, a size that disagrees with the header, or no records) raises :class:`DataError`.
    """
    compressed = path.endswith(".gz")
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        problem = ("ends early" if isinstance(err, EOFError) else
                   f"has a damaged gzip stream ({type(err).__module__}.{type(err).__name__}: "
                   f"{err})")
        raise DataError(f"the compressed IDX file {path} {problem}. {_REINSTALL}") from err
    except OSError as err:
        raise DataError(f"cannot read the IDX file {path} ({type(err).__name__}: {err}); check "
                        "that it is a readable file") from err
    if len(data) >= 2 and data[:2] == b"\x1f\x8b" and not compressed:
        raise DataError(f"{path} is gzip-compressed but its name does not end in .gz: rename it "
                        f"to {os.path.basename(path)}.gz or decompress it (gunzip)")
    if len(data) < 4:
        raise DataError(f"{path} is truncated inside its header ({len(data)} bytes). "
                        + _REINSTALL)
    if data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad header {data[:4]!r}; an IDX file "
                        "starts with two zero bytes, a type code and the number of dimensions)")
    code, ndim = data[2], data[3]
    if code not in _IDX_TYPES:
        known = ", ".join(f"0x{c:02X} {name}" for c, (name, _) in _IDX_TYPES.items())
        raise DataError(f"{path} is not an IDX file: unknown type code 0x{code:02X} (known: "
                        f"{known}). " + _REINSTALL)
    if ndim == 0:
        raise DataError(f"{path} declares no dimensions, so it holds no records. " + _REINSTALL)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated inside its header ({len(data)} bytes, the header "
                        f"of {ndim} dimensions needs {header}). " + _REINSTALL)
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    name, dtype = _IDX_TYPES[code]
    if 0 in shape:
        what = "0 records" if shape[0] == 0 else "empty records"
        raise DataError(f"{path} holds {what}: its header declares shape {shape}. " + _REINSTALL)
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow on a bad header
    present = len(data) - header
    if present != expected:
        damage = "the file is truncated" if present < expected else "extra bytes follow the data"
        raise DataError(
            f"{path} holds {present} data bytes but its header declares shape {shape} of "
            f"{name}, {expected} bytes: {damage}. " + _REINSTALL
        )
    return np.frombuffer(data, dtype, offset=header).reshape(shape)


def _find(directory, stem):
    for name in (stem + ".gz", stem):
        candidate = os.path.join(directory, name)
        if os.path.exists(candidate):
            return candidate
    return None


def _read_fashion_file(path: str, what: str, ndim: int) -> np.ndarray:
    """One Fashion-MNIST IDX file, checked to hold unsigned bytes in ``ndim`` dimensions."""
    array = read_idx(path)
    if array.dtype != np.uint8:
        code = next(c for c, (_, dtype) in _IDX_TYPES.items() if dtype == array.dtype)
        values = "pixels 0..255" if ndim == 3 else "class indices"
        raise DataError(
            f"{path} holds {_idx_type_name(code)}, but Fashion-MNIST {what} must be "
            f"{_idx_type_name(0x08)}: {values}. Use the original files (`apt-get install "
            "--reinstall dataset-fashion-mnist`) or write the values as uint8 (type 0x08)"
        )
    if array.ndim != ndim:
        layout = "[records, height, width]" if ndim == 3 else "[records]"
        raise DataError(f"{path} holds an array of shape {array.shape}, but Fashion-MNIST {what} "
                        f"are {ndim}-D {layout}. Use the {what} file of the dataset")
    return array


class FashionMNIST:
    """Fashion-MNIST (Xiao et al. 2017), read from its four IDX files.

    28x28 grayscale garments in 10 classes, 60,000 train and 10,000 test images. ``path`` defaults
    to where Debian's ``dataset-fashion-mnist`` package puts them.
    """

    def __init__(self, split: str = "train", path: Optional[str] = None):
        if split not in ("train", "test"):
            raise DataError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
        path = path or FASHION_MNIST_DEFAULT_PATH
        prefix = "train" if split == "train" else "t10k"
        files = {key: _find(path, f"{prefix}-{key}-idx{nd}-ubyte")
                 for key, nd in (("images", 3), ("labels", 1))}
        missing = [k for k, v in files.items() if v is None]
        if missing:
            raise DataError(
                f"Fashion-MNIST {split} {' and '.join(missing)} not found in {path}. Install them "
                "with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files go to "
                f"{FASHION_MNIST_DEFAULT_PATH}) or set config.data.path to a folder holding "
                f"{prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz]."
            )
        images = _read_fashion_file(files["images"], "images", 3)
        labels = _read_fashion_file(files["labels"], "labels", 1)
        if len(images) != len(labels):
            raise DataError(
                f"{files['images']} holds {len(images)} images but {files['labels']} holds "
                f"{len(labels)} labels; they must describe the same examples: use the image and "
                "label files of one download (or reinstall them with `apt-get install "
                "--reinstall dataset-fashion-mnist`)"
            )
        num_classes = len(FASHION_MNIST_CLASSES)
        if labels.max() >= num_classes:
            raise DataError(
                f"{files['labels']} holds the label {int(labels.max())}, but Fashion-MNIST has "
                f"{num_classes} classes (labels 0..{num_classes - 1}): it is not a Fashion-MNIST "
                "labels file or it is damaged. " + _REINSTALL
            )
        self.images = images[..., None]
        self.labels = labels.astype(np.int32)
        self.num_classes = num_classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"image": self.images[index], "label": self.labels[index]}

    def read_batch(self, indices):
        """Records ``indices`` as arrays with a leading batch axis (one fancy index each)."""
        return {"image": self.images[indices], "label": self.labels[indices]}

    def __repr__(self):
        return f"FashionMNIST(num_records={len(self)})"


# What tfds.data_source reads with random access, by tfds's FileFormat values.
TFDS_RANDOM_ACCESS_FORMATS = ("array_record", "parquet")
_TFDS_RECIPE = ("prepare it as array_record (docs/data.md: `tfds.builder(NAME, data_dir=DIR, "
                "file_format='array_record').download_and_prepare()` where the internet is "
                "reachable, or diffusion_jax.data.tfds_build.write_image_dataset for your own "
                "images), copy DIR here and set config.data.data_dir to it")


def import_tfds(purpose: str):
    """The ``tensorflow_datasets`` module, or a DataError saying how to install it."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise DataError(f"{purpose} needs tensorflow-datasets: `pip install -e \".[tfds]\"` "
                        "(or `pip install tensorflow-datasets`)") from err
    return tfds


def _last_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


class TFDSSource:
    """Any TensorFlow Datasets dataset prepared as array_record (or parquet), read record by record.

    It reads through ``tfds``'s random-access data sources: no TensorFlow is needed. The data
    must already be prepared in ``data_dir`` (``None``: tfds's default, ``~/tensorflow_datasets``
    or ``$TFDS_DATA_DIR``). ``split`` takes tfds's slicing (``"train[:90%]"``,
    ``"train[10:20]+test"``). Records are ``{"image": uint8 [H, W, C]}`` from ``image_key``, with
    ``"label"`` (int32) from ``label_key`` when that is a ``ClassLabel`` feature, whose class count
    becomes ``num_classes``. ``label_key=""`` takes ``"label"`` when the dataset has it and reads
    no labels otherwise; ``None`` never reads labels; any other name must exist.
    """

    # Records are read (and decoded) from files: grain's reader threads overlap the file I/O.
    read_threads = 16

    def __init__(self, name: str, split: str = "train", data_dir: Optional[str] = None,
                 image_key: str = "image", label_key: Optional[str] = ""):
        tfds = import_tfds(f"reading the TFDS dataset {name!r}")
        where = f"TFDS dataset {name!r} in data_dir={data_dir!r}"
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError as err:  # (it lists every dataset)
            raise DataError(f"{where} was not found ({_last_line(err)}); {_TFDS_RECIPE}") from err
        except Exception as err:  # noqa: BLE001 - tfds raises many types on damaged folders
            raise DataError(f"{where} could not be opened ({type(err).__name__}: "
                            f"{_last_line(err)}); {_TFDS_RECIPE}") from err
        if not builder.is_prepared():
            raise DataError(f"{where} is not prepared; {_TFDS_RECIPE}")
        # The prepared format, and any a conversion added (`tfds convert_format`).
        formats = [getattr(f, "value", str(f)) for f in builder.info.available_file_formats()]
        if not set(formats) & set(TFDS_RANDOM_ACCESS_FORMATS):
            raise DataError(
                f"{where} is prepared as {' and '.join(formats)}, which has no random access; "
                f"training reads {' or '.join(TFDS_RANDOM_ACCESS_FORMATS)}: prepare it again "
                "with file_format='array_record' into another data_dir, or convert it with "
                "`tfds convert_format` (docs/data.md)")
        splits = sorted(builder.info.splits)
        try:
            self._source = builder.as_data_source(split=split)
            count = len(self._source)
        except (ValueError, KeyError, AssertionError) as err:
            raise DataError(f"{where}: split {split!r} cannot be read ({_last_line(err)}); its "
                            f"splits are {splits}, sliced as 'train[:90%]' or "
                            "'train[100:200]'") from err
        if count <= 0:
            raise DataError(f"{where}: split {split!r} selects no records; its splits are "
                            f"{splits}")
        features = builder.info.features
        keys = sorted(features.keys())
        if image_key not in keys:
            raise DataError(f"{where} has no image feature {image_key!r} (its features: {keys}); "
                            "set config.data.image_key")
        image = features[image_key]
        if not isinstance(image, tfds.features.Image):
            raise DataError(f"{where}: feature {image_key!r} ({type(image).__name__}) is not "
                            f"an image feature (its features: {keys}); set config.data.image_key")
        self.image_shape = tuple(image.shape)  # None where images differ in size
        if label_key == "":
            label_key = "label" if "label" in keys else None
        elif label_key is not None and label_key not in keys:
            raise DataError(f"{where} has no label feature {label_key!r} (its features: {keys}); "
                            "set config.data.label_key, or config.data.class_conditional=False")
        if label_key is not None and not isinstance(features[label_key],
                                                    tfds.features.ClassLabel):
            raise DataError(f"{where}: feature {label_key!r} "
                            f"({type(features[label_key]).__name__}) is not a ClassLabel, so its "
                            "class count is unknown; set config.data.label_key to a ClassLabel "
                            "feature, or config.data.class_conditional=False")
        self.num_classes = None if label_key is None else int(features[label_key].num_classes)
        self.image_key, self.label_key = image_key, label_key
        self.name, self.split, self.splits = name, split, splits

    def __len__(self):
        return len(self._source)

    def __getitem__(self, index):
        record = self._source[int(index)]
        out = {"image": np.asarray(record[self.image_key])}
        if self.label_key is not None:
            out["label"] = np.int32(record[self.label_key])
        return out

    def __repr__(self):
        return f"TFDSSource(name={self.name!r}, split={self.split!r}, num_records={len(self)})"


def _rng(seed, index):
    return np.random.default_rng([seed, index])


class Toy2D:
    """2-D toy distributions for quick checks.

    ``"mixture"`` (8 Gaussians on a circle, labels are the components), ``"checkerboard"`` and
    ``"swiss_roll"``. Point i is generated from (seed, i), so the dataset is the same on every
    machine."""

    KINDS = ("mixture", "checkerboard", "swiss_roll")

    def __init__(self, kind: str = "mixture", size: int = 100_000, seed: int = 0):
        if kind not in self.KINDS:
            raise DataError(f"unknown 2-D toy dataset {kind!r}; choose one of {self.KINDS}")
        self.kind, self.size, self.seed = kind, int(size), int(seed)
        self.num_classes = 8 if kind == "mixture" else None

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        rng = _rng(self.seed, index)
        if self.kind == "mixture":
            k = int(rng.integers(8))
            angle = 2 * math.pi * k / 8
            x = np.array([math.cos(angle), math.sin(angle)]) * 2.0 + 0.1 * rng.standard_normal(2)
            return {"x": x.astype(np.float32), "label": np.int32(k)}
        if self.kind == "checkerboard":
            while True:
                x = rng.uniform(-2.0, 2.0, 2)
                if (math.floor(x[0]) + math.floor(x[1])) % 2 == 0:
                    return {"x": x.astype(np.float32)}
        turn = 1.5 * math.pi * (1 + 2 * rng.uniform())
        x = np.array([turn * math.cos(turn), turn * math.sin(turn)]) / 5.0
        return {"x": (x + 0.05 * rng.standard_normal(2)).astype(np.float32)}

    def __repr__(self):
        return f"Toy2D(kind={self.kind!r}, size={self.size}, seed={self.seed})"


# The lowest depth of an object's pixel in the depth-like maps of procedural data (0: background).
DEPTH_FLOOR = 0.25


def dome_depth(masks: np.ndarray, distances: np.ndarray, reach) -> np.ndarray:
    """A depth-like map of drawn objects: a dome on each, 1 at its centre, 0 on the background.

    ``masks`` (bool [objects, H, W]) are the objects' pixels, ``distances`` (the same shape) each
    pixel's distance from its object's centre and ``reach`` ([objects, 1, 1]) a distance no pixel
    of the object exceeds. On an object, depth = f + (1 - f) sqrt(1 - (distance / reach)^2) with
    f = DEPTH_FLOOR: a spherical cap, 1 at the centre and at least f at its edge, so the map's
    support is exactly the objects' mask while its values say more than the mask does. It is
    not a rendering of any camera, only a control map that differs from the mask inside objects.
    Returns float32 [H, W] (objects never overlap; where they would, the nearer dome wins).
    """
    ratio = np.minimum(np.asarray(distances, np.float32) / np.asarray(reach, np.float32), 1.0)
    dome = DEPTH_FLOOR + (1.0 - DEPTH_FLOOR) * np.sqrt(1.0 - ratio * ratio)
    return np.where(masks, dome, 0.0).max(axis=0).astype(np.float32)


class Shapes:
    """Procedural RGB images of one filled shape in a random colour, size and position.

    The label is the shape (0 circle, 1 square, 2 triangle); the background colour is random too.
    Image i is generated from (seed, i); ``geometry(i)`` is its object's exact mask and
    depth-like map (:func:`dome_depth`), for control maps (ControlNet).
    """

    CLASSES = ("circle", "square", "triangle")
    # No pixel of a shape lies further than this many radii from its centre (a triangle's base
    # corners are the furthest, at sqrt(0.7^2 + 1.02^2) = 1.24 radii).
    _REACH = 1.25

    def __init__(self, size: int = 50_000, resolution: int = 32, seed: int = 0):
        if resolution < 8:
            raise DataError(f"Shapes resolution must be at least 8, got {resolution}")
        self.size, self.resolution, self.seed = int(size), int(resolution), int(seed)
        self.num_classes = len(self.CLASSES)
        grid = (np.arange(resolution) + 0.5) / resolution
        self._yy, self._xx = np.meshgrid(grid, grid, indexing="ij")

    def __len__(self):
        return self.size

    def _draw(self, index):
        """``(image, label, mask, distances, radius)`` of record ``index``."""
        rng = _rng(self.seed, index)
        label = int(rng.integers(3))
        radius = rng.uniform(0.18, 0.32)
        cy, cx = rng.uniform(radius, 1 - radius, 2)
        dy, dx = self._yy - cy, self._xx - cx
        if label == 0:
            mask = dy**2 + dx**2 <= radius**2
        elif label == 1:
            mask = (np.abs(dy) <= radius * 0.8) & (np.abs(dx) <= radius * 0.8)
        else:  # upward triangle: below the apex, inside both slanted edges
            mask = (dy <= radius * 0.7) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)
        background = rng.integers(0, 256, 3)
        colour = (background + rng.integers(80, 176, 3)) % 256  # keep a visible contrast
        image = np.where(mask[..., None], colour, background).astype(np.uint8)
        return image, label, mask, np.sqrt(dy**2 + dx**2), radius

    def __getitem__(self, index):
        image, label, _, _, _ = self._draw(index)
        return {"image": image, "label": np.int32(label)}

    def geometry(self, index) -> dict:
        """Record ``index``'s object: ``{"mask": bool [H, W], "depth": float32 [H, W]}``.

        ``depth`` is :func:`dome_depth` of the object (0 on the background)."""
        _, _, mask, distances, radius = self._draw(index)
        depth = dome_depth(mask[None], distances[None], np.full((1, 1, 1), self._REACH * radius))
        return {"mask": mask, "depth": depth}

    def __repr__(self):
        return f"Shapes(size={self.size}, resolution={self.resolution}, seed={self.seed})"
