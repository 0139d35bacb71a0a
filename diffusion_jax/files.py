"""Image and array files: uint8 pixels, PNG grids, .npz arrays and JSON, written atomically.

Every writer goes through a temporary file in the target folder that is renamed into place, so a
crash leaves either the previous file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile

import numpy as np
from PIL import Image

__all__ = ["to_uint8", "quantize", "make_grid", "save_png", "save_grid", "save_arrays", "save_json",
           "atomic_write", "settings_digest", "reserve_stem", "save_result"]


def to_uint8(images):
    """[-1, 1] floats -> uint8 pixels."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(
        np.uint8)


def quantize(images):
    """Images in [-1, 1] as an 8-bit file would store them, back in [-1, 1] floats."""
    return to_uint8(images).astype(np.float32) / 127.5 - 1.0


def atomic_write(path, write):
    """Call ``write(tmp_path)`` and rename the result to ``path`` (creating its folder)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def make_grid(images, columns=None) -> np.ndarray:
    """Tile a batch of NHWC images in [-1, 1] into one uint8 image, row by row.

    ``columns`` defaults to a square layout; a single channel is returned as a 2-D grayscale
    image.
    """
    pixels = to_uint8(images)
    num, height, width, channels = pixels.shape
    columns = columns or int(math.ceil(math.sqrt(num)))
    rows = int(math.ceil(num / columns))
    grid = np.zeros((rows * height, columns * width, channels), np.uint8)
    for i in range(num):
        r, c = divmod(i, columns)
        grid[r * height:(r + 1) * height, c * width:(c + 1) * width] = pixels[i]
    return grid[..., 0] if channels == 1 else grid


def save_png(pixels, path):
    """Write a uint8 image ([H, W] or [H, W, 3]) as a PNG file (atomically); returns it."""
    image = Image.fromarray(pixels)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return pixels


def save_grid(images, path, columns=None):
    """Write a batch of NHWC images in [-1, 1] as one PNG grid (written atomically)."""
    return save_png(make_grid(images, columns), path)


def save_json(path, value):
    """Write a JSON-able value to ``path`` atomically (indented, for people to read)."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(value, f, indent=1)
    atomic_write(path, write)


def save_arrays(path, **arrays):
    """Write arrays to an .npz file atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write(path, write)


def settings_digest(settings) -> str:
    """Eight hex digits that differ between any two different JSON-able ``settings``."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def reserve_stem(directory: str, name: str) -> str:
    """A new path stem ``directory/name`` (or ``name_2``, ``name_3``, ...) that nothing uses yet.

    The stem is reserved by creating ``stem.json`` exclusively (atomic even between processes),
    so two writers never get the same one and no earlier output is overwritten; the caller
    writes its files beside it and then the JSON itself (with :func:`save_json`).
    """
    os.makedirs(directory, exist_ok=True)
    for attempt in range(1, 10_000):
        stem = os.path.join(directory, name if attempt == 1 else f"{name}_{attempt}")
        try:
            os.close(os.open(stem + ".json", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            continue
        return stem
    raise FileExistsError(f"{directory} holds 10,000 outputs named {name}; clear it out")


def save_result(directory: str, name: str, result: dict, settings: dict) -> str:
    """Write ``result`` with its ``settings`` as a new JSON file; return its path.

    The file is ``directory/<name>_<digest of settings>.json`` (with a ``_2``... suffix when that
    exists already, see :func:`reserve_stem`), so results of different settings never share a
    name and none is overwritten.
    """
    stem = reserve_stem(directory, f"{name}_{settings_digest(settings)}")
    save_json(stem + ".json", {**result, "settings": settings})
    return stem + ".json"
