"""Editing with any denoiser: image-to-image (SDEdit) and inpainting (RePaint), and their inputs.

Image-to-image (Meng et al. 2022) noises the input to a time part-way up the sampler's grid and
runs the sampler from there. ``strength`` in [0, 1] says how far up, counted in the grid's steps
as diffusers counts them: of N steps the last ``min(int(N * strength), N)`` run, starting from
``alpha(t) x0 + sigma(t) z`` at the first of them. Strength 0 runs no step and returns the
input; strength 1 runs all N from pure noise and is exactly text-to-image (the input plays no
part).

Inpainting keeps a known region (:class:`diffusion_jax.samplers.KnownRegion`): after every step
the known part of the state is replaced by the input noised to that step's time, and after the
last one by the input itself, so the output equals the input there exactly (Lugmayr et al.
2022). RePaint's resampling jumps are ``jump_length`` / ``jump_n_sample`` of
:func:`diffusion_jax.samplers.sample`. Inpainting takes ``strength`` too (1 by default: the
masked region starts from pure noise).

Masks follow diffusers: white (>= 0.5) is the region to repaint, black is kept. A mask for a
latent model is taken to the latent grid by nearest-neighbour sampling (as PyTorch's
``interpolate`` does), so the same files give diffusers' latent masks.

The functions here work on arrays in the sampler's space (pixels in [-1, 1], or latents); the
model families' own entry points (``--mode=sample`` with ``config.sampling.init_image``, the
Stable Diffusion pipeline's ``img2img`` and ``inpaint``) encode images and masks with them.
"""

from __future__ import annotations

import os
from typing import Optional

import jax.numpy as jnp
import numpy as np
from PIL import Image

from diffusion_jax import samplers
from diffusion_jax import schedules as schedules_lib
from diffusion_jax import time_grids

__all__ = ["steps_to_run", "network_times", "noised", "image_to_image", "read_image",
           "read_mask", "resize_mask", "keep_from_mask", "open_image", "unit_values"]

# samplers.sample's arguments that choose the grid; replaced by the image-to-image time_grid.
_GRID_ARGS = ("num_steps", "grid", "time_grid", "t_min", "t_max", "rho", "snap")


def steps_to_run(num_steps: int, strength: float) -> int:
    """How many of ``num_steps`` steps image-to-image runs: ``min(int(N * strength), N)``.

    diffusers' rule (its img2img and inpainting pipelines' ``get_timesteps``), so that the same
    ``strength`` starts at the same timestep."""
    strength = float(strength)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1] (0 returns the input, 1 starts from pure "
                         f"noise), got {strength:g}")
    return min(int(num_steps * strength), int(num_steps))


def network_times(schedule, *, num_steps=None, grid="uniform", time_grid=None, t_min=None,
                  t_max=None, rho=7.0, snap=None) -> np.ndarray:
    """The N network times ``samplers.sample`` visits with these grid arguments."""
    schedule = schedules_lib.get(schedule)
    if time_grid is not None:
        return np.asarray(time_grid, np.float64).reshape(-1)
    if num_steps is None:
        raise ValueError("give num_steps (or an explicit time_grid)")
    return time_grids.time_grid(schedule, num_steps, grid, t_min=t_min, t_max=t_max, rho=rho,
                                snap=snap)[:-1]


def noised(schedule, x0, noise, t):
    """``alpha(t) x0 + sigma(t) noise``: the forward process at one time t."""
    schedule = schedules_lib.get(schedule)
    dtype = jnp.promote_types(jnp.asarray(x0).dtype, jnp.float32)
    t = jnp.asarray(t, dtype)
    return schedule.alpha(t) * x0.astype(dtype) + schedule.sigma(t) * noise.astype(dtype)


def image_to_image(denoise_fn, x0, noise, *, strength: float, schedule, method: str,
                   key=None, known: Optional[samplers.KnownRegion] = None,
                   **sample_kwargs) -> samplers.SampleResult:
    """SDEdit: ``x0`` noised to the grid's step that ``strength`` selects, then the sampler.

    ``x0`` is the input in the sampler's space and ``noise`` standard normal of its shape; the
    other arguments are :func:`diffusion_jax.samplers.sample`'s (grid, options, ``t_end``,
    ``known``, ...). Strength 1 is ``samplers.sample(denoise_fn, noise, ...)`` itself; strength 0
    returns ``x0`` (nfe 0). Otherwise the last ``steps_to_run(N, strength)`` network times of
    the grid are run, from ``noised(schedule, x0, noise, t_start)``."""
    x0 = jnp.asarray(x0)
    noise = jnp.asarray(noise)
    if x0.shape != noise.shape:
        raise ValueError(f"the input has shape {x0.shape} and the noise {noise.shape}; they "
                         "must match")
    schedule = schedules_lib.get(schedule)
    grid_args = {k: sample_kwargs.pop(k) for k in _GRID_ARGS if k in sample_kwargs}
    times = network_times(schedule, **grid_args)
    run = steps_to_run(len(times), strength)
    if run == len(times):
        return samplers.sample(denoise_fn, noise, schedule=schedule, method=method, key=key,
                               known=known, **grid_args, **sample_kwargs)
    if run == 0:
        final = np.asarray([0.0])
        return samplers.SampleResult(x0.astype(noise.dtype), 0, final, None)
    times = times[len(times) - run:]
    sample_kwargs.pop("prior_scale", None)  # the first state is given
    start = noised(schedule, x0, noise, times[0]).astype(noise.dtype)
    return samplers.sample(denoise_fn, start, schedule=schedule, method=method, key=key,
                           time_grid=times, prior_scale=1.0, known=known, **sample_kwargs)


# ----------------------------------------------------------------------------------------------
# Inputs: images and masks from files or arrays.
# ----------------------------------------------------------------------------------------------


def open_image(path: str, what: str = "the image") -> Image.Image:
    """The image file ``path`` as a PIL image, or an error naming ``what`` and the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist (give the path of a PNG or JPEG "
                                "file)")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except Exception as err:  # Pillow raises many types for a damaged or foreign file
        raise ValueError(f"{what} {path} cannot be read as an image ({type(err).__name__}: "
                         f"{err}); give a PNG or JPEG file") from err


def _unit_array(value, what: str, mode: str, height: int, width: int, resample) -> np.ndarray:
    """A file (converted to ``mode``, resized with ``resample``) or an array, as floats in [0, 1].

    An array is taken at its size: uint8 in [0, 255] or floats (or bools) in [0, 1]."""
    if isinstance(value, (str, os.PathLike)):
        picture = open_image(value, f"the {what}").convert(mode)
        if picture.size != (width, height):
            picture = picture.resize((width, height), resample)
        return np.asarray(picture, np.float32) / 255.0
    return unit_values(value, what)


def unit_values(value, what: str) -> np.ndarray:
    """An array as float32 in [0, 1]: uint8 in [0, 255] scaled, floats (or bools) checked."""
    array = np.asarray(value)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    array = array.astype(np.float32)
    if array.size and (array.min() < 0.0 or array.max() > 1.0):
        raise ValueError(f"a {what} array must hold values in [0, 1] (floats) or [0, 255] "
                         f"(uint8), got values in [{array.min():g}, {array.max():g}]")
    return array


def read_image(image, height: int, width: int, channels: int = 3) -> np.ndarray:
    """An image file or array as float32 [height, width, channels] in [0, 1].

    A path is read with Pillow, converted to RGB (``channels=3``) or grey (1) and resized to
    ``height`` x ``width`` with a bicubic filter (diffusers' pipelines resize the same way,
    without cropping). An array is taken as it is: uint8 in [0, 255] or floats in [0, 1],
    [height, width, channels] or [height, width] for grey."""
    array = _unit_array(image, "image", "RGB" if channels == 3 else "L", height, width,
                        Image.BICUBIC)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape != (height, width, channels):
        raise ValueError(f"the image has shape {array.shape}; this model needs [height, width, "
                         f"channels] = {(height, width, channels)}")
    return array


def read_mask(mask, height: int, width: int) -> np.ndarray:
    """A mask file or array as float32 [height, width, 1]: 1 to repaint, 0 to keep.

    White (>= 0.5 of full scale) means repaint, as in diffusers. A file is read as grey and
    resized with nearest-neighbour sampling; an array (bool, uint8 or floats in [0, 1],
    [height, width] or [height, width, 1]) is taken at its size."""
    array = _unit_array(mask, "mask", "L", height, width, Image.NEAREST)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.shape != (height, width):
        raise ValueError(f"the mask has shape {array.shape}; it must be [height, width] = "
                         f"{(height, width)} (or [height, width, 1])")
    return (array >= 0.5).astype(np.float32)[..., None]


def resize_mask(mask, height: int, width: int):
    """[batch, H, W, 1] masks at ``height`` x ``width`` by nearest-neighbour sampling.

    Output pixel i reads input pixel floor(i * H / height), PyTorch's ``interpolate``
    (mode "nearest"), which diffusers uses to take masks to the latent grid."""
    mask = jnp.asarray(mask)
    rows = np.floor(np.arange(height) * (mask.shape[1] / height)).astype(np.int32)
    cols = np.floor(np.arange(width) * (mask.shape[2] / width)).astype(np.int32)
    return mask[:, rows][:, :, cols]


def keep_from_mask(mask):
    """The ``KnownRegion.keep`` of a repaint mask (1 to repaint): ``1 - mask``."""
    return 1.0 - jnp.asarray(mask, jnp.float32)

