"""Control maps for ControlNet, computed from any image or from a renderer's geometry.

ControlNet (Zhang, Rao and Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models") guides a denoiser with a control image. A control map here is uint8 [H, W, 3], as
diffusers' ControlNet pipelines take control images (the input pipeline scales it to [0, 1],
not [-1, 1]):

- "canny": Canny edges (Canny 1986, "A Computational Approach to Edge Detection") of any image,
  255 on edges and 0 elsewhere, through scikit-image (``pip install -e '.[control]'``);
- "mask": the exact mask of the drawn objects, white on black, for procedural sources that know
  their geometry (``CaptionedShapes``, ``Shapes``);
- "depth": their depth-like map (``sources.dome_depth``: a dome on each object, 0 on the
  background) as grayscale, for the same sources.

:class:`WithControl` wraps a data source so that each record also holds its ``"control"``.
"""

from __future__ import annotations

import numpy as np

from diffusion_jax.data.sources import DataError

__all__ = ["CONTROL_TYPES", "GEOMETRY_CONTROLS", "canny", "control_map", "WithControl"]

CONTROL_TYPES = ("canny", "mask", "depth")
GEOMETRY_CONTROLS = ("mask", "depth")  # those only a renderer that knows its objects can give
# Canny's defaults, for images in [0, 1]: a Gaussian of 1 pixel smooths away the noise of a
# generated image's flat regions, and the hysteresis thresholds (on the Sobel gradient's
# magnitude) keep steps of about 0.16 of the range or more: two colours of the procedural data
# differ by at least twice that in some channel, while noise of a few percent makes no edges.
CANNY_SIGMA = 1.0
CANNY_LOW_THRESHOLD = 0.2
CANNY_HIGH_THRESHOLD = 0.4
_GEOMETRY_SOURCES = ("CaptionedShapes (config.data.name='captions') and Shapes "
                     "(config.data.name='shapes')")


def _unit_image(image) -> np.ndarray:
    """``image`` as float64 [H, W, C] in [0, 1], or a ValueError saying what it should be."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"a control map is computed from an image [H, W], [H, W, 1] or "
                         f"[H, W, 3]; got shape {image.shape} (drop an alpha channel with "
                         "image[..., :3], move a leading channel axis last)")
    if image.dtype == np.uint8:
        return image / 255.0
    if image.dtype.kind == "f":
        if image.size and not (image.min() >= 0.0 and image.max() <= 1.0):
            raise ValueError(f"a float image must lie in [0, 1] for a control map; got values in "
                             f"[{image.min():g}, {image.max():g}] (from the model's [-1, 1] "
                             "range: (image + 1) / 2)")
        return image.astype(np.float64)
    raise ValueError(f"a control map is computed from uint8 pixels or floats in [0, 1]; got "
                     f"{image.dtype}")


def _three_channels(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=-1)


def canny(image, sigma: float = CANNY_SIGMA, low_threshold: float = CANNY_LOW_THRESHOLD,
          high_threshold: float = CANNY_HIGH_THRESHOLD) -> np.ndarray:
    """Canny edges of an image (Canny 1986) as a control map: uint8 [H, W, 3], 255 on edges.

    ``image`` is uint8 or float in [0, 1], [H, W], [H, W, 1] or [H, W, 3].
    ``skimage.feature.canny`` (Gaussian smoothing of width ``sigma`` pixels, Sobel gradients,
    non-maximum suppression, hysteresis between the thresholds, which are gradient magnitudes
    of the image in [0, 1]) runs on each colour channel, a pixel is an edge when it is one in
    any channel, and the union is thinned to lines one pixel wide (``skimage.morphology.thin``:
    two channels may mark one boundary on its two sides). A grayscale conversion would lose
    edges between colours of equal luminance (the procedural palette's red and blue differ by
    about 1% in luminance); OpenCV's Canny, which diffusers' examples run on RGB images,
    likewise takes each pixel's gradient from its strongest channel. The edge map is
    replicated to the three channels canny ControlNets take.
    """
    try:
        from skimage import feature, morphology  # optional: the "control" extra
    except ImportError as err:
        raise ImportError("Canny control maps need scikit-image: pip install -e '.[control]' "
                          "(or pip install scikit-image)") from err
    unit = _unit_image(image)
    edges = np.zeros(unit.shape[:2], bool)
    for channel in range(unit.shape[-1]):
        edges |= feature.canny(unit[..., channel], sigma=sigma, low_threshold=low_threshold,
                               high_threshold=high_threshold)
    return _three_channels(morphology.thin(edges).astype(np.uint8) * np.uint8(255))


def _check_kind(kind: str) -> None:
    if kind not in CONTROL_TYPES:
        raise ValueError(f"unknown control type {kind!r}; choose one of {CONTROL_TYPES}")


def _no_geometry(kind: str, what: str) -> ValueError:
    return ValueError(
        f"control {kind!r} is the exact {'mask' if kind == 'mask' else 'depth-like map'} of "
        f"the drawn objects, which only procedural sources know: {_GEOMETRY_SOURCES}; {what} "
        "gives no geometry: use control 'canny', which works from any image")


def control_map(kind: str, image, geometry: dict | None = None) -> np.ndarray:
    """The control map of type ``kind`` of one image: uint8 [H, W, 3].

    "canny" needs only ``image`` (:func:`canny` with its defaults); "mask" and "depth" need the
    renderer's ``geometry`` of that image, ``{"mask": bool [H, W], "depth": float [H, W] in
    [0, 1]}`` (``CaptionedShapes.geometry(i)``, ``Shapes.geometry(i)``): the mask white on
    black, the depth-like map as grayscale (0 on the background)."""
    _check_kind(kind)
    if kind == "canny":
        return canny(image)
    if geometry is None:
        raise _no_geometry(kind, "an image without its geometry (geometry=None)")
    values = np.asarray(geometry[kind])
    height, width = np.shape(image)[:2]
    if values.shape != (height, width):
        raise ValueError(f"geometry[{kind!r}] has shape {values.shape}, the image "
                         f"{(height, width)}: give the geometry of this image")
    if kind == "mask":
        return _three_channels(values.astype(bool).astype(np.uint8) * np.uint8(255))
    return _three_channels(np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8))


class WithControl:
    """A data source whose records also hold ``"control"``: the ``kind`` map of their image.

    ``source`` is any source of ``{"image": uint8 [H, W, C], ...}`` records; every other key
    and attribute (``num_classes``, ``has_captions``, ``read_threads``, ...) is the source's.
    "mask" and "depth" need a source with ``geometry(index)`` (see :func:`control_map`); a
    source without it is refused here. Record i's control is computed from record i alone, so
    it is the same whenever it is read. A source that reads whole batches (``read_batch``)
    still does, with each row's control added.
    """

    def __init__(self, source, kind: str):
        _check_kind(kind)
        if kind in GEOMETRY_CONTROLS and not callable(getattr(source, "geometry", None)):
            raise _no_geometry(kind, repr(source))
        self.source, self.kind = source, kind
        if hasattr(source, "read_batch"):
            self.read_batch = self._read_batch

    def __len__(self):
        return len(self.source)

    def _control(self, index, image) -> np.ndarray:
        geometry = self.source.geometry(index) if self.kind in GEOMETRY_CONTROLS else None
        return control_map(self.kind, image, geometry)

    def __getitem__(self, index):
        record = self.source[index]
        if not hasattr(record, "keys") or "image" not in record:
            found = sorted(record) if hasattr(record, "keys") else type(record).__name__
            raise DataError(f"{self!r} computes control maps from images; record {index} "
                            f"has {found}: use an image dataset, or no ControlNet")
        return {**record, "control": self._control(index, record["image"])}

    def _read_batch(self, indices):
        """The source's records ``indices`` (a leading batch axis), each with its control map."""
        records = self.source.read_batch(indices)
        controls = [self._control(int(index), image)
                    for index, image in zip(np.asarray(indices), records["image"])]
        return {**records, "control": np.stack(controls)}

    def __getattr__(self, name):
        # Only called for what this object lacks; "source" before __init__ sets it (unpickling).
        if name == "source" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.source, name)

    def __repr__(self):
        return f"WithControl({self.source!r}, kind={self.kind!r})"
