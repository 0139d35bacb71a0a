"""Write images (and labels) as a TFDS dataset in array_record: offline, without TensorFlow.

``TFDSSource`` (``config.data.name = "tfds"``) reads datasets that ``tensorflow_datasets`` prepared
as array_record. Preparing one usually runs a registered builder where the internet is reachable;
for images you already have, :func:`write_image_dataset` is that builder: a
``tfds.core.GeneratorBasedBuilder`` made for the call, whose examples are PNG-encoded bytes. (Handed
a numpy array, tfds encodes it with TensorFlow and fails without it; bytes and PIL images it
stores as they are.)

    from diffusion_jax.data import tfds_build
    tfds_build.write_image_dataset(
        "my_images", "/data/tfds",
        {"train": [(image, label), ...], "test": [...]}, class_names=["cat", "dog"])

and then ``--config.data.name=tfds --config.data.tfds_name=my_images
--config.data.data_dir=/data/tfds``.
"""

from __future__ import annotations

import io
import itertools
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Optional

import numpy as np

from diffusion_jax.data.sources import DataError, import_tfds

__all__ = ["write_image_dataset", "png_bytes"]


def _as_array(image, where: str) -> np.ndarray:
    """A uint8 HWC array of an array, a PIL image or an image file's path."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            image = np.asarray(opened.convert("RGB"))
    elif isinstance(image, Image.Image):  # palette, 1-bit, RGBA, ... as RGB; grayscale stays
        image = np.asarray(image if image.mode == "L" else image.convert("RGB"))
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise DataError(f"{where}: images must be uint8 (pixels 0..255), got {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise DataError(f"{where}: images must be [height, width] or [height, width, 1 or 3], "
                        f"got shape {image.shape}")
    return image


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of a uint8 [H, W, 1 or 3] array (what tfds stores without TensorFlow)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_image_dataset(name: str, data_dir: str, splits: Mapping[str, Iterable], *,
                        class_names: Optional[Sequence[str]] = None,
                        image_shape: Optional[tuple] = None,
                        file_format: str = "array_record", version: str = "1.0.0",
                        description: str = "") -> str:
    """Prepare the TFDS dataset ``name`` in ``data_dir``; returns its folder.

    ``splits`` maps split names to iterables of examples: an image (uint8 [H, W] or [H, W, C]
    with 1 or 3 channels, a PIL image or an image file's path) or, with ``class_names``, a pair
    ``(image, label)`` whose label is an index into ``class_names`` or one of the names. The
    features are ``image`` (``tfds.features.Image``) and, with class names, ``label``
    (``ClassLabel``). ``image_shape`` defaults to the first image's; ``(None, None, 3)`` admits
    images of any size (train on them with ``data.resize=True``). tfds writes into a temporary
    folder and renames it when done, so a failed call leaves no dataset behind. A dataset already
    prepared there is an error: delete its folder or give another ``version``.
    """
    tfds = import_tfds("writing a TFDS dataset")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise DataError(f"TFDS dataset names are snake_case (lower-case letters, digits, '_'), "
                        f"as tfds finds them by; got {name!r}")
    if name in tfds.list_builders(with_community_datasets=False):
        raise DataError(f"{name!r} is the name of a dataset in tfds's catalogue, whose builder "
                        "would be found instead of these files; choose another name")
    if not splits:
        raise DataError(f"write_image_dataset({name!r}): give at least one split")
    folder = os.path.join(data_dir, name, version)
    if os.path.exists(os.path.join(folder, "dataset_info.json")):
        raise DataError(f"the TFDS dataset {name!r} {version} is already prepared in {folder}; "
                        "delete that folder or give another version")
    labelled = class_names is not None
    names = list(class_names or ())

    def examples(split, items):
        count = 0
        for i, item in enumerate(items):
            count += 1
            where = f"{name}, split {split!r}, example {i}"
            if labelled:
                if not (isinstance(item, (tuple, list)) and len(item) == 2):
                    raise DataError(f"{where}: with class_names, examples are (image, label) "
                                    f"pairs, got {type(item).__name__}")
                image, label = item
                if isinstance(label, str):
                    if label not in names:
                        raise DataError(f"{where}: label {label!r} is not one of {names}")
                    label = names.index(label)
                label = int(label)
                if not 0 <= label < len(names):
                    raise DataError(f"{where}: label {label} is outside 0..{len(names) - 1}")
                yield {"image": _as_array(image, where), "label": label}
            else:
                yield {"image": _as_array(item, where)}
        if not count:
            raise DataError(f"{name}: split {split!r} is empty")

    streams = {split: examples(split, items) for split, items in splits.items()}
    if image_shape is None:  # the first image's, put back in front of its stream
        split = next(iter(streams))
        first = next(streams[split])  # (an empty split is a DataError)
        image_shape = first["image"].shape
        streams[split] = itertools.chain([first], streams[split])
    features = {"image": tfds.features.Image(shape=tuple(image_shape))}
    if labelled:
        features["label"] = tfds.features.ClassLabel(names=names)

    class _Images(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)

        def _info(self):
            # Not dataset_info_from_configs: that reads files beside the builder's module.
            return tfds.core.DatasetInfo(
                builder=self, description=description or f"{name}: images written by "
                "diffusion_jax.data.tfds_build", features=tfds.features.FeaturesDict(features),
                supervised_keys=("image", "label") if labelled else None)

        def _split_generators(self, dl_manager):
            del dl_manager  # nothing to download
            return {split: self._generate_examples(split) for split in streams}

        def _generate_examples(self, split):
            for i, example in enumerate(streams[split]):
                image = example["image"]
                if len(image.shape) != len(image_shape) or any(
                        want is not None and want != got
                        for want, got in zip(image_shape, image.shape)):
                    raise DataError(f"{name}, split {split!r}, example {i}: image of shape "
                                    f"{image.shape}, but the dataset's images are "
                                    f"{tuple(image_shape)} (None: any size); give "
                                    "image_shape=(None, None, 3) for images of several sizes")
                yield i, {**example, "image": png_bytes(image)}

    _Images.name = name
    builder = _Images(data_dir=data_dir, file_format=file_format)
    builder.download_and_prepare()
    return folder
