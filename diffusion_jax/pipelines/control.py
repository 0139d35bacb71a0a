"""ControlNets of the Stable Diffusion pipeline: loaded folders, control images, scales, windows.

:func:`load` reads a diffusers ``ControlNetModel`` folder for a loaded model and checks that it
fits its UNet and VAE. :class:`ControlRequest` holds a call's ``control_image``,
``controlnet_conditioning_scale``, ``control_guidance_start`` and ``control_guidance_end``, and
:func:`request` turns them into arrays (:class:`ControlArrays`) that the compiled program reads
as data, so a new control image, scale or window reuses the program. Inside it the UNet is a
:class:`~diffusion_jax.models.controlnet.ControlledUNet` (:func:`controlled`), both halves of
classifier-free guidance read the control images (:func:`conditioning`), and each ControlNet's
scale is zero outside its window (:func:`windowed`, over
:func:`diffusion_jax.guidance.windowed_control`).

As in diffusers' ``StableDiffusionControlNetPipeline``: control images are prepared as its
``VaeImageProcessor(do_normalize=False)`` prepares them (a file or PIL image resized with a
Lanczos filter and converted to RGB, an array resized by nearest-neighbour sampling, values in
[0, 1]); the output size defaults to the first control image's; a window counts the steps that
run (image-to-image: those after ``strength``). Differences: the scale defaults to 1 for
image-to-image and inpainting too (diffusers' pipelines for those default to 0.8 and 0.5);
windows are per sampler step, where diffusers counts network evaluations (the same for DDIM,
Euler, DPM-Solver++, UniPC, DDPM; its PNDM and Heun evaluate more often than they step);
``guess_mode`` is taken only as diffusers takes it for a first ControlNet with
``global_pool_conditions`` (the unconditional half then gets no control).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from diffusion_jax import editing, guidance
from diffusion_jax.models.controlnet import ControlledUNet, ControlNet
from diffusion_jax.models.unet import UNet
from diffusion_jax.pretrained import controlnet as controlnet_lib

__all__ = ["LoadedControlNet", "ControlRequest", "ControlArrays", "load", "request",
           "read_control_image", "control_size", "guess_mode", "controlled", "conditioning",
           "windowed"]


@dataclasses.dataclass(frozen=True)
class LoadedControlNet:
    """One ControlNet folder loaded for a pipeline: where from, module, parameters, config."""

    path: str
    module: ControlNet
    params: dict
    config: dict


@dataclasses.dataclass(frozen=True)
class ControlArrays:
    """What one call's ControlNets read, all data to the compiled program.

    images: one float32 [batch, height, width, channels] array in [0, 1] per ControlNet.
    scales: float32 [ControlNets], the conditioning scales.
    windows: one per ControlNet, ``window(x_t, t, {"control_scale": s}) -> s`` where the
      ControlNet acts at ``t`` and 0 elsewhere (:func:`diffusion_jax.guidance.windowed_control`
      of the steps' :func:`~diffusion_jax.guidance.control_window`), a ``Partial`` whose time
      bounds are data.
    """

    images: tuple
    scales: np.ndarray
    windows: tuple


def load(path, models, *, sharding_for=None) -> LoadedControlNet:
    """Load the ControlNet folder ``path`` for ``models`` (a loaded Stable Diffusion model).

    The ControlNet is read in the UNet's computation and parameter dtypes, each parameter placed
    by ``sharding_for`` as it is read. It must fit the UNet
    (:func:`diffusion_jax.pretrained.controlnet.check_fits`) and read control images at the
    model's image size (its encoder halves the image as often as the VAE does); otherwise a
    ValueError names the folder and what differs."""
    name = f"the ControlNet in {os.fspath(path)}"
    param_dtype = jax.tree_util.tree_leaves(models.unet_params)[0].dtype
    module, params, config = controlnet_lib.load_controlnet(
        path, dtype=models.unet.dtype, param_dtype=param_dtype, sharding_for=sharding_for,
        remat=models.unet.remat, attention=models.unet.attention)
    controlnet_lib.check_fits(module, params, models.unet, models.unet_params, name=name)
    if module.control_factor != models.latent_factor:
        raise ValueError(
            f"{name} reads control images {module.control_factor}x the latents' size "
            f"(conditioning_embedding_out_channels={list(module.embedding_channels)}), but this "
            f"model's VAE makes latents 1/{models.latent_factor} of the image size: it was "
            "built for another base model")
    return LoadedControlNet(os.fspath(path), module, params, config)


def guess_mode(controlnets: Sequence[LoadedControlNet]) -> bool:
    """Whether the ControlNets act on the conditional half of guidance alone.

    diffusers' pipelines switch to "guess mode" when the first ControlNet pools its residuals
    (``global_pool_conditions``, e.g. a shuffle ControlNet): the unconditional half then gets
    no control. Guess mode for ControlNets that do not pool (diffusers' ``guess_mode=True``,
    which also scales the residuals from 0.1 to 1) is not implemented."""
    pooled = [c.module.pool_residuals for c in controlnets]
    if pooled[0] and not all(pooled):
        raise ValueError(
            f"the first ControlNet ({controlnets[0].path}) pools its residuals "
            "(global_pool_conditions), which puts diffusers' pipelines in guess mode for all "
            "ControlNets; guess mode for ControlNets that do not pool "
            f"({', '.join(c.path for c, p in zip(controlnets, pooled) if not p)}) is not "
            "implemented: load a pooling ControlNet after the others")
    return pooled[0]


def read_control_image(image, height: int, width: int) -> np.ndarray:
    """One control image as float32 [height, width, channels] in [0, 1].

    ``image``: a file path or PIL image (resized with a Lanczos filter, then converted to RGB,
    as diffusers does), or an array [H, W, channels] (uint8 in [0, 255] or floats in [0, 1];
    resized by nearest-neighbour sampling)."""
    if isinstance(image, (str, os.PathLike)):
        image = editing.open_image(image, "control_image")
    if isinstance(image, Image.Image):
        image = image.resize((width, height), resample=Image.LANCZOS).convert("RGB")
        return np.asarray(image, np.float32) / 255.0
    array = np.asarray(image)
    if array.ndim != 3:
        raise ValueError(f"a control_image array has shape {array.shape}; give [height, width, "
                         "channels] (or a batch [batch, height, width, channels])")
    array = editing.unit_values(array, "control_image")
    if array.shape[:2] != (height, width):
        array = np.asarray(editing.resize_mask(array[None], height, width))[0]
    return array


def _per_prompt(image, batch: int, height: int, width: int, which: str) -> np.ndarray:
    """One ControlNet's control image(s) -> [batch, height, width, channels]."""
    if isinstance(image, (list, tuple)):
        items = [read_control_image(item, height, width) for item in image]
    elif not isinstance(image, (str, os.PathLike, Image.Image)) and np.ndim(image) == 4:
        items = [read_control_image(item, height, width) for item in np.asarray(image)]
    else:
        items = [read_control_image(image, height, width)]
    if len(items) == 1:
        items = items * batch
    if len(items) != batch:
        raise ValueError(f"{len(items)} control images{which} for {batch} prompts: give one, or "
                         "one per prompt")
    if len({item.shape for item in items}) != 1:
        raise ValueError(f"the control images{which} differ in channels "
                         f"({sorted({item.shape[-1] for item in items})})")
    return np.stack(items)


def _per_controlnet(value, count: int, name: str) -> list:
    """A number or one per ControlNet -> a list of ``count`` floats."""
    values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value] * count
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} values for {count} ControlNets: give one "
                         "number, or one per ControlNet")
    return [float(v) for v in values]


def control_size(control_image, latent_factor: int):
    """The (height, width) of the first control image, down to a multiple of ``latent_factor``.

    diffusers' ControlNet pipelines generate at the control image's size when no size is
    given."""
    first = control_image
    while isinstance(first, (list, tuple)):
        first = first[0]
    if isinstance(first, (str, os.PathLike)):
        if not os.path.isfile(os.fspath(first)):
            raise FileNotFoundError(f"control_image {os.fspath(first)} does not exist (give the "
                                    "path of a PNG or JPEG file)")
        with Image.open(os.fspath(first)) as opened:
            width, height = opened.size
    elif isinstance(first, Image.Image):
        width, height = first.size
    else:
        shape = np.shape(first)
        if len(shape) not in (3, 4):
            raise ValueError(f"a control_image array has shape {shape}; give [height, width, "
                             "channels] or [batch, height, width, channels]")
        height, width = shape[-3:-1]
    return height - height % latent_factor, width - width % latent_factor


def request(controlnets: Sequence[LoadedControlNet], control_image, batch: int, height: int,
            width: int, times, scale=1.0, start=0.0, end=1.0) -> ControlArrays:
    """A call's control inputs as arrays, checked against the loaded ControlNets.

    ``control_image``: for one ControlNet an image (path, PIL image, array [H, W, C]), a batch
    array [batch, H, W, C] or a list with one per prompt; for several, a list with one such
    entry per ControlNet. ``times`` are the sampler's network times of the steps run; ``scale``,
    ``start`` and ``end`` one number or one per ControlNet (diffusers'
    ``controlnet_conditioning_scale``, ``control_guidance_start`` and ``control_guidance_end``).
    """
    count = len(controlnets)
    if count == 1:
        per_net = [control_image]
    elif not isinstance(control_image, (list, tuple)) or len(control_image) != count:
        raise ValueError(f"{count} ControlNets are loaded: give control_image as a list with one "
                         f"entry per ControlNet ({count})")
    else:
        per_net = list(control_image)
    images = []
    for i, (net, image) in enumerate(zip(controlnets, per_net)):
        which = "" if count == 1 else f" of ControlNet {i} ({net.path})"
        array = _per_prompt(image, batch, height, width, which)
        if array.shape[-1] != net.module.control_channels:
            raise ValueError(f"control_image{which} has {array.shape[-1]} channels, but the "
                             f"ControlNet in {net.path} reads {net.module.control_channels} "
                             "(conditioning_channels); give an image with that many channels")
        images.append(array)
    if isinstance(start, (list, tuple)) and not isinstance(end, (list, tuple)):
        end = [end] * len(start)
    if isinstance(end, (list, tuple)) and not isinstance(start, (list, tuple)):
        start = [start] * len(end)
    starts = _per_controlnet(start, count, "control_guidance_start")
    ends = _per_controlnet(end, count, "control_guidance_end")
    windows = tuple(guidance.windowed_control(jax.tree_util.Partial(_scale), times,
                                              guidance.control_window(len(times), s, e))
                    for s, e in zip(starts, ends))
    # The bounds as numpy arrays: one dtype and no weak type, whatever the window (an infinite
    # bound is a Python float), so that every window reuses the compiled program.
    windows = jax.tree_util.tree_map(np.asarray, windows)
    scales = np.asarray(_per_controlnet(scale, count, "controlnet_conditioning_scale"),
                        np.float32)
    return ControlArrays(tuple(images), scales, windows)


def controlled(unet: UNet, controlnets: Sequence[ControlNet], unet_params, arrays: dict):
    """The :class:`ControlledUNet` of ``unet`` and ``controlnets``, and its parameters.

    ``arrays`` are :meth:`ControlRequest.inputs`' (inside the program)."""
    params = {"unet": unet_params,
              **{f"controlnets_{i}": p for i, p in enumerate(arrays["params"])}}
    return ControlledUNet(unet, tuple(controlnets)), params


def conditioning(arrays: dict, cond: dict, uncond: Optional[dict], guess: bool):
    """``cond`` and ``uncond`` (None without guidance) with the control images and scales.

    Both halves of guidance read the control images; in guess mode the unconditional half has
    scale 0 (diffusers' pipelines give it no residuals)."""
    images = tuple(jnp.asarray(image) for image in arrays["images"])
    batch = images[0].shape[0]
    scales = jnp.broadcast_to(arrays["scales"][None], (batch, arrays["scales"].shape[0]))
    cond = {**cond, "control": images, "control_scale": scales}
    if uncond is not None:
        uncond = {**uncond, "control": images,
                  "control_scale": jnp.zeros_like(scales) if guess else scales}
    return cond, uncond


def _scale(x_t, t, cond):
    """The model function of a window alone: the conditioning scale it was handed."""
    return cond["control_scale"]


def _windowed(denoise, windows, x_t, t, cond):
    scale = cond["control_scale"]  # [batch, ControlNets]; column i times window i's 0 or 1
    scale = jnp.stack([window(x_t, t, {"control_scale": scale})[:, i]
                       for i, window in enumerate(windows)], axis=1)
    return denoise(x_t, t, {**cond, "control_scale": scale})


def windowed(denoise, arrays: dict):
    """``denoise(x_t, t, cond)`` with each ControlNet's scale 0 outside its window.

    ``arrays["windows"]`` are :class:`ControlArrays`' (one per ControlNet); the result is a
    ``Partial`` whose leaves (parameters, window bounds) are data."""
    return jax.tree_util.Partial(_windowed, denoise, tuple(arrays["windows"]))


@dataclasses.dataclass(frozen=True)
class ControlRequest:
    """What a call asked of the loaded ControlNets (before reading any file)."""

    controlnets: tuple
    image: object
    scale: object = 1.0
    start: object = 0.0
    end: object = 1.0

    @classmethod
    def of(cls, controlnets, control_image=None, scale=1.0, start=0.0,
           end=1.0) -> Optional["ControlRequest"]:
        """A call's control arguments, checked: None without ``control_image``.

        A scale or window without ``control_image``, or ``control_image`` without a loaded
        ControlNet, is a ValueError."""
        if control_image is None:
            for name, value, default in (("controlnet_conditioning_scale", scale, 1.0),
                                         ("control_guidance_start", start, 0.0),
                                         ("control_guidance_end", end, 1.0)):
                if not isinstance(value, (int, float)) or float(value) != default:
                    raise ValueError(f"{name} was given without control_image: pass the "
                                     "control image(s) too")
            return None
        if not controlnets:
            raise ValueError("control_image was given, but no ControlNet is loaded: call "
                             "pipe.load_controlnet(folder) first, or pass "
                             "StableDiffusion.from_pretrained(path, controlnet=folder)")
        return cls(tuple(controlnets), control_image, scale, start, end)

    @property
    def static(self) -> tuple:
        """What the compiled program is specialised on: (ControlNet modules, guess mode)."""
        return tuple(c.module for c in self.controlnets), guess_mode(self.controlnets)

    def size(self, height: Optional[int], width: Optional[int], latent_factor: int):
        """The output size: as given, else the first control image's (diffusers' default)."""
        if height is None or width is None:
            default = control_size(self.image, latent_factor)
            height, width = height or default[0], width or default[1]
        return height, width

    def inputs(self, batch: int, height: int, width: int, sample_kwargs: dict,
               strength: Optional[float] = None) -> dict:
        """The arrays the ControlNets read in the program: parameters, images, scales, window.

        ``sample_kwargs`` are the call's ``samplers.sample`` arguments (their grid gives the
        window's steps); with a ``strength`` (image-to-image) the steps that run are the grid's
        last ``editing.steps_to_run(N, strength)``."""
        grid_args = {k: v for k, v in sample_kwargs.items() if k in editing._GRID_ARGS}
        times = editing.network_times(sample_kwargs["schedule"], **grid_args)
        if strength is not None:
            times = times[len(times) - editing.steps_to_run(len(times), strength):]
        arrays = request(self.controlnets, self.image, batch, height, width, times, self.scale,
                         self.start, self.end)
        return {"params": [c.params for c in self.controlnets], "images": arrays.images,
                "scales": arrays.scales, "windows": arrays.windows}
