"""A trained run's inputs to edit from: image-to-image, inpainting and image-to-video.

``config.sampling.init_image`` turns ``--mode=sample`` (and :func:`generate.make_generate_fn`
given ``edit=``) into an edit of that image, in the ways :mod:`diffusion_jax.editing` defines:

- an image run without ``mask_image``: image-to-image (SDEdit) from the image;
- an image run with ``mask_image``: inpainting of the mask's white region (RePaint);
- a video run: image-to-video. The image is the first frame of every clip, and the sampler
  paints the frames after it. It is inpainting in time: the known region is frame 0 of the
  clip (:func:`first_frame_mask`). After every step, frame 0 of the state is replaced by the
  image noised to that step's time, so the network's temporal layers see the given frame at
  the noise level of the others and the output's frame 0 is the image exactly. No training is
  needed: any video model does it. RePaint's resampling (``jump_n_sample`` > 1) lets the later
  frames agree more closely with the first; ``strength`` is 1 unless set.

:class:`EditInputs` holds what the sampler starts from; :func:`first_frame_inputs` builds it
from arrays (one first frame per clip, as video evaluation does).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import configuration, editing, samplers

__all__ = ["EditInputs", "edit_inputs", "first_frame_mask", "first_frame_inputs",
           "sample_edited", "mode_name"]


class EditInputs(NamedTuple):
    """What image-to-image, inpainting and image-to-video start from, in the sampler's space.

    x0: the input [1 or batch, ...] (pixels in [-1, 1], or a latent run's scaled latents); for
        image-to-video, clips whose frame 0 is the given frame.
    mask: None, or [1 or batch, ..., 1] with 1 where the sampler repaints (at x0's size; a
        video's [1, frames, 1, 1, 1] from :func:`first_frame_mask`).
    strength: the share of the steps run (see :mod:`diffusion_jax.editing`).
    jump_length, jump_n_sample: RePaint's resampling (with a mask only; 1 = off)."""

    x0: jax.Array
    mask: Optional[jax.Array]
    strength: float
    jump_length: int = 10
    jump_n_sample: int = 1


def first_frame_mask(frames: int) -> np.ndarray:
    """The repaint mask of image-to-video: float32 [1, frames, 1, 1, 1], 0 on frame 0, else 1."""
    if int(frames) < 2:
        raise ValueError(f"image-to-video needs clips of at least 2 frames, not {frames}: the "
                         "first is given, the others are generated")
    mask = np.ones((1, int(frames), 1, 1, 1), np.float32)
    mask[:, 0] = 0.0
    return mask


def first_frame_inputs(first_frames, frames: int, *, strength: float = 1.0,
                       jump_length: int = 10, jump_n_sample: int = 1) -> EditInputs:
    """Image-to-video inputs from first frames [1 or batch, height, width, channels] in [-1, 1].

    Each clip of ``frames`` frames keeps its first frame and has the others painted."""
    first = jnp.asarray(first_frames, jnp.float32)
    if first.ndim != 4:
        raise ValueError(f"first frames of shape {tuple(first.shape)}: give [1 or batch, "
                         "height, width, channels] in [-1, 1]")
    mask = first_frame_mask(frames)
    x0 = jnp.broadcast_to(first[:, None], (first.shape[0], int(frames)) + first.shape[1:])
    return EditInputs(x0, jnp.asarray(mask), float(strength), int(jump_length),
                      int(jump_n_sample))


def edit_inputs(config, example_shape, space=None, key=None) -> Optional[EditInputs]:
    """``config.sampling.init_image`` (and ``mask_image``) for a run, or None.

    The image is read at the run's resolution (``example_shape``, or for a latent run the
    autoencoder's image size) into [-1, 1]; a latent run encodes it with ``space`` (a posterior
    sample from ``key``) and takes the mask to the latent grid by nearest-neighbour sampling.
    A video run (``example_shape`` [frames, height, width, channels]) reads it as the first
    frame of every clip."""
    s = config.sampling
    if not s.init_image:
        return None
    kind = len(example_shape)
    if kind not in (3, 4) or (kind == 4 and space is not None):
        raise configuration.ConfigError(
            f"config.sampling.init_image={s.init_image!r} starts an image or a pixel video from "
            f"an image; this run makes examples of shape {tuple(example_shape)}: leave "
            "sampling.init_image empty")
    height, width, channels = example_shape[-3:]
    if space is not None:
        factor = space.autoencoder.downsampling_factor
        height, width, channels = height * factor, width * factor, space.autoencoder.in_channels
    try:
        image = editing.read_image(s.init_image, height, width, channels)[None] * 2.0 - 1.0
        mask = (editing.read_mask(s.mask_image, height, width)[None] if s.mask_image
                else None)
    except (OSError, ValueError) as err:
        raise configuration.ConfigError(f"config.sampling.init_image / mask_image: {err}") \
            from err
    strength = configuration.editing_strength(config)
    if kind == 4:
        return first_frame_inputs(image, example_shape[0], strength=strength,
                                  jump_length=s.jump_length, jump_n_sample=s.jump_n_sample)
    x0 = jnp.asarray(image)
    if space is not None:
        key = jax.random.key(s.seed) if key is None else key
        x0 = space.encode_batch({"x": x0}, jax.random.fold_in(key, 2))["x"]
        if mask is not None:
            mask = editing.resize_mask(mask, *example_shape[:2])
    return EditInputs(x0, None if mask is None else jnp.asarray(mask), strength,
                      s.jump_length, s.jump_n_sample)


def sample_edited(fn, noise, edit: Optional[EditInputs], sample_kwargs):
    """The samples of ``fn`` from ``noise``: plain, or an edit of ``edit``'s input."""
    if edit is None:
        return samplers.sample(fn, noise, **sample_kwargs).samples
    x0 = jnp.broadcast_to(edit.x0, noise.shape)
    known = None
    if edit.mask is not None:
        keep = editing.keep_from_mask(jnp.broadcast_to(edit.mask, noise.shape[:-1] + (1,)))
        known = samplers.KnownRegion(x0, keep)
        sample_kwargs.update(jump_length=edit.jump_length, jump_n_sample=edit.jump_n_sample)
    try:
        return editing.image_to_image(fn, x0, noise, strength=edit.strength, known=known,
                                      **sample_kwargs).samples
    except ValueError as err:
        raise configuration.ConfigError(f"config.sampling: {err}") from err


def mode_name(config) -> str:
    """A file name prefix saying what was done, "" for plain generation.

    "img2img<strength>_", "inpaint<strength>_", or "i2v_" (image-to-video; "i2v<strength>_"
    when the strength is not 1)."""
    s = config.sampling
    if not s.init_image:
        return ""
    if configuration.data_kind(config) == "video":
        strength = configuration.editing_strength(config)
        return "i2v_" if strength == 1.0 else f"i2v{strength:g}_"
    return f"{'inpaint' if s.mask_image else 'img2img'}{configuration.editing_strength(config):g}_"
