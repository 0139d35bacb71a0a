"""How well generated images follow the control maps a ControlNet was given, on procedural shapes.

Two measures, each a mean over images and each 1.0 when an image follows its control exactly:

- ``mask_iou``: intersection over union of the generated object's mask and the control's. For
  mask and depth controls the generated mask is exact for the procedural renderer's palette
  (:func:`object_mask`: each pixel classified to its nearest palette colour, the background's
  colour left out) and the control's is the mask itself or the depth map's support; for Canny
  controls both are the regions the edges enclose (generated edges against the control's), which
  a broken outline empties, so there ``edge_f1`` is the primary measure.
- ``edge_f1``: F1 of the generated image's Canny edges against the control's edges
  (:func:`edge_f1`), an edge counting as found when the other map has one within a pixel: the
  boundary F-measure of Perazzi et al. 2016 ("A Benchmark Dataset and Evaluation Methodology
  for Video Object Segmentation", contour accuracy F).

:func:`adherence` gives both for every control type in ``data.controls.CONTROL_TYPES``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from diffusion_jax.data import controls as controls_lib
from diffusion_jax.data.captions import PALETTE

__all__ = ["object_mask", "mask_iou", "edge_f1", "adherence"]


def _pixels(images) -> np.ndarray:
    """Images as float32 pixel values 0..255: uint8 as they are, floats from [-1, 1]."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32)
    if images.dtype.kind != "f":
        raise ValueError(f"images must be uint8 or floats in [-1, 1]; got {images.dtype}")
    return np.clip((images.astype(np.float32) + 1.0) * 127.5, 0.0, 255.0)


def _batch_of_images(images, what: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{what} must be a batch of RGB images [batch, height, width, 3]; got "
                         f"shape {images.shape} (add a batch axis with images[None])")
    return images


def _border_mode(classes: np.ndarray) -> np.ndarray:
    """Per image of ``classes`` [B, H, W]: the most common value on the image's border."""
    border = np.concatenate([classes[:, 0, :], classes[:, -1, :], classes[:, 1:-1, 0],
                             classes[:, 1:-1, -1]], axis=1)
    return np.array([np.bincount(row, minlength=len(PALETTE)).argmax() for row in border])


def object_mask(images, background_colour=None) -> np.ndarray:
    """The object pixels of procedural-shape images: bool [B, H, W].

    ``images`` [B, H, W, 3] are uint8 or floats in [-1, 1] (generated images). Each pixel is
    classified to its nearest colour of ``captions.PALETTE``; object pixels are those not
    classified as the background, ``background_colour`` (a palette index, or one per image),
    by default the most common class on each image's border (objects never cover most of it).
    """
    pixels = _pixels(_batch_of_images(images, "object_mask's images"))
    palette = PALETTE.astype(np.float32)
    distances = ((pixels[..., None, :] - palette) ** 2).sum(-1)  # [B, H, W, colours]
    classes = distances.argmin(-1)
    if background_colour is None:
        background = _border_mode(classes)
    else:
        background = np.broadcast_to(np.asarray(background_colour), classes.shape[:1])
        if background.dtype.kind not in "iu" or not np.all(
                (background >= 0) & (background < len(PALETTE))):
            raise ValueError(f"background_colour must be palette indices in [0, {len(PALETTE)}) "
                             f"(captions.COLOURS), got {background_colour!r}")
    return classes != background[:, None, None]


def _masks(masks, what: str) -> np.ndarray:
    masks = np.asarray(masks).astype(bool)
    if masks.ndim != 3:
        raise ValueError(f"{what} must be a batch of masks [batch, height, width]; got shape "
                         f"{masks.shape}")
    return masks


def _pair(pred, target, what: str):
    pred, target = _masks(pred, f"{what}'s prediction"), _masks(target, f"{what}'s target")
    if pred.shape != target.shape:
        raise ValueError(f"{what} compares masks of one shape; got {pred.shape} and "
                         f"{target.shape}")
    return pred, target


def mask_iou(pred, target) -> np.ndarray:
    """Per image, the intersection over union of two masks [B, H, W]: float [B].

    Two empty masks agree perfectly: their IoU is 1.0."""
    pred, target = _pair(pred, target, "mask_iou")
    intersection = (pred & target).sum(axis=(1, 2))
    union = (pred | target).sum(axis=(1, 2))
    return np.where(union > 0, intersection / np.maximum(union, 1), 1.0)


def edge_f1(pred_edges, target_edges, tolerance: int = 1) -> np.ndarray:
    """Per image, the F1 of predicted edges against target edges [B, H, W] (nonzero = edge).

    A predicted edge pixel is correct (precision) when a target edge lies within ``tolerance``
    pixels (Chebyshev distance: a (2 tolerance + 1)-square window), and a target edge pixel is
    found (recall) when a predicted one does: Perazzi et al. 2016's contour accuracy F, with
    a square instead of a disk. Two empty maps agree perfectly (1.0); one empty map against
    edges scores 0. Returns float [B]."""
    pred, target = _pair(pred_edges, target_edges, "edge_f1")
    if int(tolerance) != tolerance or tolerance < 0:
        raise ValueError(f"tolerance is a whole number of pixels >= 0, got {tolerance!r}")
    window = np.ones((1, 2 * int(tolerance) + 1, 2 * int(tolerance) + 1), bool)
    near_target = ndimage.binary_dilation(target, window)
    near_pred = ndimage.binary_dilation(pred, window)
    pred_count, target_count = pred.sum(axis=(1, 2)), target.sum(axis=(1, 2))
    precision = (pred & near_target).sum(axis=(1, 2)) / np.maximum(pred_count, 1)
    recall = (target & near_pred).sum(axis=(1, 2)) / np.maximum(target_count, 1)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return np.where((pred_count == 0) & (target_count == 0), 1.0, f1)


def _unit_controls(controls) -> np.ndarray:
    """Control maps [B, H, W, 3] as float32 in [0, 1] (uint8 scaled, floats as they are)."""
    controls = np.asarray(controls)
    if controls.dtype == np.uint8:
        return controls.astype(np.float32) / 255.0
    if controls.dtype.kind != "f" or (controls.size and not (controls.min() >= 0.0
                                                             and controls.max() <= 1.0)):
        raise ValueError("control maps must be uint8 or floats in [0, 1] (as the pipeline gives "
                         f"them); got {controls.dtype} values")
    return controls.astype(np.float32)


def _edges(images) -> np.ndarray:
    """Canny edges (``data.controls.canny``) of uint8 images [B, H, W, C]: bool [B, H, W]."""
    return np.stack([controls_lib.canny(image)[..., 0] > 0 for image in images])


def _enclosed(edges) -> np.ndarray:
    """The regions edge maps [B, H, W] enclose, outlines included: bool [B, H, W]."""
    return np.stack([ndimage.binary_fill_holes(image_edges) for image_edges in edges])


def adherence(generated, controls, kind: str) -> dict:
    """Mean ``mask_iou`` and ``edge_f1`` of generated images against their control maps.

    ``generated`` [B, H, W, 3] are uint8 or floats in [-1, 1]; ``controls`` [B, H, W, 3] the
    maps they were conditioned on, uint8 or floats in [0, 1], of type ``kind``. The generated
    image's edges are ``data.controls.canny``'s; the control's are a Canny map itself, or the
    Canny edges of the mask ("mask") or of the depth map's nonzero support ("depth") drawn
    white on black. The masks compared: :func:`object_mask` of the generated image against the
    mask or support of a "mask" or "depth" control; for "canny", the regions the two edge maps
    enclose (outlines and what they surround), so that a real image against its own Canny map
    scores 1.0 on both measures.
    """
    if kind not in controls_lib.CONTROL_TYPES:
        raise ValueError(f"unknown control type {kind!r}; choose one of "
                         f"{controls_lib.CONTROL_TYPES}")
    generated = _batch_of_images(generated, "the generated images")
    unit = _unit_controls(_batch_of_images(controls, "the control maps"))
    if generated.shape != unit.shape:
        raise ValueError(f"{generated.shape[0]} generated images of shape {generated.shape[1:]} "
                         f"against {unit.shape[0]} control maps of shape {unit.shape[1:]}: "
                         "give one control map per image, of the image's size")
    images = np.round(_pixels(generated)).astype(np.uint8)
    drawn = unit.max(axis=-1) > 0.5 / 255  # any nonzero pixel of the map
    generated_edges = _edges(images)
    if kind == "canny":
        target_edges, target_mask = drawn, _enclosed(drawn)
        generated_mask = _enclosed(generated_edges)
    else:
        target_mask = drawn
        target_edges = _edges(drawn.astype(np.uint8) * np.uint8(255))
        generated_mask = object_mask(images)
    return {"mask_iou": float(mask_iou(generated_mask, target_mask).mean()),
            "edge_f1": float(edge_f1(generated_edges, target_edges).mean())}
