"""Image and array files: uint8 pixels, PNG grids, .npz arrays and JSON, written atomically.

Every writer goes through a temporary file in the target folder that is renamed into place, so a
crash leaves either the previous file or the new one, never half of one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np
from PIL import Image

__all__ = ["to_uint8", "quantize", "make_grid", "save_grid", "save_arrays", "save_json",
           "atomic_write"]


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


def save_grid(images, path, columns=None):
    """Write a batch of NHWC images in [-1, 1] as one PNG grid (written atomically)."""
    grid = make_grid(images, columns)
    image = Image.fromarray(grid)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return grid


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
