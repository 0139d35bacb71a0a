"""A folder of the user's own images as a data source, and a resize and crop for any image source.

``ImageFolder(path, resolution)`` reads every png, jpg, jpeg, webp and bmp file under ``path``
(any letter case, subfolders included, hidden files and folders left out), in the sorted order of
their paths relative to ``path``. Each record is ``{"image": uint8 [R, R, 3]}``, plus
``"caption": str`` when the folder has captions, laid out as diffusers' fine-tuning scripts (and
the Hugging Face ``imagefolder`` loader) expect:

    folder/metadata.jsonl   one JSON object a line: {"file_name": "a.png", "text": "a cat"}
                            (the text column may also be called "caption"; file names are
                            relative to the folder, e.g. "sub/b.jpg")
    folder/a.png, folder/a.txt, ...   or, without metadata.jsonl: a caption file per image

Only the metadata.jsonl of the folder itself is read (not metadata.csv, nor one in a subfolder);
with captions="auto" an image that has none gets the empty caption.

Images are brought to RGB (greyscale and palette images are expanded, transparent pixels are
composited over white, 16-bit greyscale is scaled to 8 bits, EXIF orientation is applied), then
resized so the shorter side is ``resolution`` and cropped to the centre square
(:func:`resize_center_crop`: Pillow's bicubic filter, which antialiases when it shrinks). A JPEG
at least twice the resolution is first decoded at a reduced scale (libjpeg's DCT scaling to 1/2,
1/4 or 1/8, never below the resolution), which makes reading large photos much cheaper.

Building the source only opens every file's header (and checks PNG chunk checksums with
Pillow's ``verify``), which is cheap; files that fail are left out with one log line. Decoding
happens when a record is read, so a file damaged past its header (a truncated JPEG) raises
:class:`~diffusion_jax.data.DataError` naming it then.

:class:`Resized` gives any image source (a TFDS dataset whose images are larger than the model's,
or of mixed sizes) the same resize and centre crop.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageOps

from diffusion_jax.data.sources import DataError

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "Resized", "resize_center_crop"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_MODES = ("auto", "none", "required")
METADATA_FILE = "metadata.jsonl"
TEXT_COLUMNS = ("text", "caption")  # the first one a metadata line has is its caption
_BICUBIC = getattr(Image, "Resampling", Image).BICUBIC  # (Pillow < 9.1 has no Resampling)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_NAMES_SHOWN = 5  # how many file names a message lists before "..."


def _some(names, limit: int = _NAMES_SHOWN) -> str:
    """``a.png, b.png, ... (12 in all)``: a few names of a list, for a message."""
    shown = ", ".join(str(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _fit(image: Image.Image, resolution: int) -> Image.Image:
    """The centre square of ``image`` resampled to ``resolution`` x ``resolution`` pixels.

    Resampling a box in one step is resizing the shorter side to ``resolution`` and cropping the
    centre, without rounding the intermediate size; pixels just outside the box still feed the
    filter, as they would before a crop.
    """
    width, height = image.size
    if (width, height) == (resolution, resolution):
        return image
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return image.resize((resolution, resolution), _BICUBIC,
                        box=(left, top, left + side, top + side))


def _check_resolution(resolution) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) \
            or resolution < 1:
        raise DataError(f"the image resolution must be a whole number of pixels >= 1, got "
                        f"{resolution!r}")
    return int(resolution)


def resize_center_crop(image: np.ndarray, resolution: int) -> np.ndarray:
    """Resize ``image`` so its shorter side is ``resolution``, then crop its centre square.

    ``image`` is uint8, [H, W] or [H, W, C]; the result is uint8 [resolution, resolution] or
    [resolution, resolution, C], the same layout. Pillow's bicubic filter resamples it, with
    antialiasing when it shrinks (the filter widens with the scale) and values clipped to
    0..255; RGBA is resampled with premultiplied alpha. An image already of the target size is
    returned unchanged.
    """
    resolution = _check_resolution(resolution)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise DataError(f"resize_center_crop needs uint8 pixels 0..255, got {array.dtype}")
    if array.ndim not in (2, 3) or 0 in array.shape:
        raise DataError(f"resize_center_crop needs an image [height, width] or [height, width, "
                        f"channels], got an array of shape {array.shape}")
    if array.shape[:2] == (resolution, resolution):
        return array
    array = np.ascontiguousarray(array)
    if array.ndim == 2:
        return np.array(_fit(Image.fromarray(array, "L"), resolution))
    channels = array.shape[-1]
    if channels in (3, 4):
        mode = "RGB" if channels == 3 else "RGBA"
        return np.array(_fit(Image.fromarray(array, mode), resolution))
    planes = [np.array(_fit(Image.fromarray(np.ascontiguousarray(array[..., c]), "L"),
                            resolution)) for c in range(channels)]
    return np.stack(planes, axis=-1)


def _to_rgb(image: Image.Image) -> Image.Image:
    """``image`` in RGB mode: alpha composited over white, 16-bit greyscale scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64) / 257.0  # 65535 -> 255
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _scan(path: str, extensions=IMAGE_EXTENSIONS) -> list:
    """Relative paths of the files under ``path`` whose names end in ``extensions`` (any case).

    Sorted; hidden files and folders are left out."""
    found = []
    for folder, subfolders, names in os.walk(path):
        subfolders[:] = [s for s in subfolders if not s.startswith(".")]
        relative = os.path.relpath(folder, path)
        for name in names:
            if not name.startswith(".") and name.lower().endswith(extensions):
                found.append(os.path.normpath(os.path.join(relative, name)))
    return sorted(found)


def _unreadable(full_path: str) -> Optional[str]:
    """Why Pillow cannot read ``full_path``'s header (or a PNG's chunks), or None if it can."""
    try:
        with Image.open(full_path) as image:
            image.verify()
    except Exception as err:  # Pillow raises many types for a damaged or foreign file
        return f"{type(err).__name__}: {err}"
    return None


def _read_metadata(path: str) -> tuple:
    """The captions of ``path/metadata.jsonl``: ``({relative path: caption}, {path: line})``."""
    metadata = os.path.join(path, METADATA_FILE)
    captions, lines = {}, {}
    try:
        with open(metadata, encoding="utf-8-sig") as f:  # (-sig: a leading BOM is skipped)
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {metadata} ({type(err).__name__}: {err}); save it as "
                        "UTF-8 text, one JSON object a line") from err
    # (split at newlines only: a JSON string may hold U+2028, where splitlines would cut it)
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{metadata} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where} is not valid JSON ({err.msg}): each line must be one "
                            'object such as {"file_name": "a.png", "text": "a photo of a '
                            'cat"}; fix or delete that line') from err
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
            raise DataError(f"{where} has no \"file_name\" string: each line must be one "
                            'object such as {"file_name": "a.png", "text": "a photo of a '
                            'cat"}')
        column = next((c for c in TEXT_COLUMNS if c in entry), None)
        if column is None or not isinstance(entry[column], str):
            raise DataError(f"{where} ({entry['file_name']}) needs its caption as a string "
                            f"under \"text\" or \"caption\"; it has the keys {sorted(entry)}")
        name = os.path.normpath(entry["file_name"])
        if name in lines:
            raise DataError(f"{where} names {entry['file_name']} again (line {lines[name]} "
                            "already gave its caption): keep one line per image")
        captions[name], lines[name] = entry[column], number
    return captions, lines


def _check_metadata_names(path: str, lines: dict, images: list) -> None:
    """Raise :class:`DataError` unless every file metadata.jsonl names is an image found."""
    known = set(images)
    for name, number in lines.items():
        if name in known:
            continue
        where = f"{os.path.join(path, METADATA_FILE)} line {number} names {name}"
        if not os.path.exists(os.path.join(path, name)):
            raise DataError(f"{where}, which does not exist in {path}: file names are relative "
                            "to the folder holding metadata.jsonl; fix the name or delete the "
                            "line")
        raise DataError(f"{where}, which is not an image this source reads (files ending in "
                        f"{', '.join(IMAGE_EXTENSIONS)}, not hidden); fix the name or delete "
                        "the line")


def _read_text_file(full_path: str) -> str:
    try:
        with open(full_path, encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read the caption file {full_path} ({type(err).__name__}: "
                        f"{err}); save it as UTF-8 text or delete it") from err


def _find_captions(path: str, images: list, scanned: list, log: Callable) -> Optional[list]:
    """Each image's caption from metadata.jsonl, else from .txt files; None when there are none.

    ``images`` are the readable ones of the ``scanned`` image files; images without a caption
    get None in the list.
    """
    if os.path.isfile(os.path.join(path, METADATA_FILE)):
        by_name, lines = _read_metadata(path)
        _check_metadata_names(path, lines, scanned)
        return [by_name.get(name) for name in images]
    if os.path.isfile(os.path.join(path, "metadata.csv")):
        log(f"ImageFolder: {path} has a metadata.csv, which is not read; write the captions "
            f"as {METADATA_FILE} (one JSON object a line) or as .txt files to use them")
    captions = []
    for name in images:
        text_file = os.path.join(path, os.path.splitext(name)[0] + ".txt")
        captions.append(_read_text_file(text_file) if os.path.isfile(text_file) else None)
    return captions if any(c is not None for c in captions) else None


class ImageFolder:
    """The image files under a folder, resized and centre-cropped to ``resolution``, with captions.

    ``captions``: "auto" reads captions when the folder has them (an image without one gets the
    empty caption, and the count is logged), "none" ignores them, "required" raises
    :class:`DataError` unless every image has one. ``log`` receives the notes on files left out.
    See the module docstring for the folder layout. There are no labels (no ``num_classes``).
    """

    CAPTION_MODES = CAPTION_MODES

    # Pillow decodes and resizes with the interpreter lock released: reader threads overlap
    # the decoding of several files (the pipeline's default for file-backed sources).
    read_threads = 16

    def __init__(self, path: str, resolution: int, *, captions: str = "auto",
                 log: Callable[[str], None] = print):
        if captions not in CAPTION_MODES:
            raise DataError(f"ImageFolder captions must be one of {CAPTION_MODES}, got "
                            f"{captions!r}")
        self.resolution = _check_resolution(resolution)
        self.path = path
        if not os.path.exists(path):
            raise DataError(f"the image folder {path} does not exist: set the path of a folder "
                            "of png/jpg/jpeg/webp/bmp images")
        if not os.path.isdir(path):
            raise DataError(f"{path} is a file, not a folder: give the folder that holds the "
                            "images")
        names = _scan(path)
        if not names:
            raise DataError(f"the folder {path} holds no image files (searched with its "
                            f"subfolders for {', '.join(IMAGE_EXTENSIONS)}, any letter case): "
                            "put the training images there")
        self._files = self._readable(names, log)
        found = None if captions == "none" else _find_captions(path, self._files, names, log)
        if found is None and captions == "required":
            raise DataError(f"the images in {path} have no captions: write {METADATA_FILE} "
                            'there (one line per image, {"file_name": "a.png", "text": "a '
                            'photo of a cat"}) or a .txt file with the same name beside each '
                            "image, or set captions='none' to train without text")
        self.has_captions = found is not None
        if self.has_captions:
            self._check_captions(found, captions, log)
            self._captions = [c if c is not None else "" for c in found]

    def _readable(self, names: list, log: Callable) -> list:
        """``names`` less the files whose header Pillow cannot read, which are logged."""
        problems = {name: _unreadable(os.path.join(self.path, name)) for name in names}
        bad = [name for name in names if problems[name] is not None]
        if len(bad) == len(names):
            raise DataError(
                f"none of the {len(names)} image files in {self.path} is a readable image "
                f"({_some([f'{n} ({problems[n]})' for n in bad], 3)}): they are damaged, or "
                "not images although their names end like one")
        if bad:
            log(f"ImageFolder: skipped {len(bad)} of {len(names)} files in {self.path} that "
                f"are not readable images: {_some([f'{n} ({problems[n]})' for n in bad], 3)}")
        return [name for name in names if problems[name] is None]

    def _check_captions(self, found: list, mode: str, log: Callable) -> None:
        missing = [name for name, c in zip(self._files, found) if c is None]
        if not missing:
            return
        what = (f"{len(missing)} of {len(self._files)} images in {self.path} have no caption "
                f"({_some(missing)})")
        if mode == "required":
            source = (f"add a line for each to {METADATA_FILE}" if os.path.isfile(
                os.path.join(self.path, METADATA_FILE)) else
                "add a .txt file with the same name beside each")
            raise DataError(f"{what}: {source}, or set captions='auto' to train them with an "
                            "empty caption")
        log(f"ImageFolder: {what}; they are read with the empty caption")

    def __len__(self):
        return len(self._files)

    def file(self, index: int) -> str:
        """The path of record ``index``'s image file."""
        return os.path.join(self.path, self._files[index])

    def __getitem__(self, index):
        full_path = self.file(int(index))
        try:
            with Image.open(full_path) as image:
                if image.format == "JPEG":  # decode at a reduced scale, still >= resolution
                    image.draft("RGB", (self.resolution, self.resolution))
                image = _to_rgb(ImageOps.exif_transpose(image))
                pixels = np.array(_fit(image, self.resolution))
        except Exception as err:  # Pillow raises many types for a damaged file
            raise DataError(
                f"cannot decode the image {full_path} ({type(err).__name__}: {err}); the folder "
                "check reads only file headers, so repair or delete this file") from err
        record = {"image": pixels}
        if self.has_captions:
            record["caption"] = self._captions[int(index)]
        return record

    def __repr__(self):
        return (f"ImageFolder(path={self.path!r}, resolution={self.resolution}, "
                f"num_images={len(self)}, captions={self.has_captions})")


class Resized:
    """Any image source with each record's image resized and centre-cropped to ``resolution``.

    Other keys of the records pass through unchanged, and so do ``num_classes``,
    ``has_captions`` and ``read_threads`` where the source has them. When the source reads
    whole batches (``read_batch``), so does this wrapper, resizing each row.
    """

    def __init__(self, source, resolution: int):
        self.source = source
        self.resolution = _check_resolution(resolution)
        for name in ("num_classes", "has_captions", "read_threads"):
            if hasattr(source, name):
                setattr(self, name, getattr(source, name))
        if hasattr(source, "read_batch"):
            self.read_batch = self._read_batch

    def __len__(self):
        return len(self.source)

    def _resized(self, record, what: str):
        if not hasattr(record, "keys") or "image" not in record:
            found = sorted(record) if hasattr(record, "keys") else type(record).__name__
            raise DataError(f"Resized({self.source!r}) needs records with an 'image'; {what} "
                            f"has {found}")
        return {**record, "image": resize_center_crop(record["image"], self.resolution)}

    def __getitem__(self, index):
        return self._resized(self.source[index], f"record {index}")

    def _read_batch(self, indices):
        """The source's records ``indices`` (a leading batch axis), every image resized."""
        records = self.source.read_batch(indices)
        if "image" not in records:
            raise DataError(f"Resized({self.source!r}) needs records with an 'image'; a batch "
                            f"has {sorted(records)}")
        images = [resize_center_crop(image, self.resolution) for image in records["image"]]
        return {**records, "image": np.stack(images)}

    def __repr__(self):
        return f"Resized({self.source!r}, resolution={self.resolution})"
