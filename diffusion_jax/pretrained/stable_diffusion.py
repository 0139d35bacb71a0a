"""Whole Stable Diffusion folders (diffusers format): ``model_index.json`` and its components.

A Stable Diffusion 1.x / 2.x folder (``StableDiffusionPipeline``) holds ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/`` and ``scheduler/``; an SDXL base folder
(``StableDiffusionXLPipeline``) adds ``text_encoder_2/`` and ``tokenizer_2/``.
:func:`load_stable_diffusion` reads them all (weights tensor by tensor, optionally in bfloat16,
placed straight into a mesh's shardings) into a :class:`StableDiffusionModels`. The safety checker
and feature extractor some folders list are not loaded. Folders of other pipelines (SD3, Flux,
Kandinsky, ...) and folders with only pickle weights are refused, naming the file.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax.numpy as jnp

from diffusion_jax.pretrained import autoencoder_kl, clip_text, clip_tokenizer, scheduler, sd_unet
from diffusion_jax.pretrained.weights import read_json_object

__all__ = ["StableDiffusionModels", "load_stable_diffusion", "read_model_index", "PIPELINES",
           "describe_folder"]

# Pipeline class -> (components it needs, family name).
_SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                    "scheduler")
# The image-to-image and inpainting pipelines' folders hold the same components (an inpainting
# UNet reads 9 channels: latents, mask, masked-image latents).
PIPELINES = {
    "StableDiffusionPipeline": (_SD_COMPONENTS, "sd"),
    "StableDiffusionImg2ImgPipeline": (_SD_COMPONENTS, "sd"),
    "StableDiffusionInpaintPipeline": (_SD_COMPONENTS, "sd"),
    "StableDiffusionXLPipeline": (_SDXL_COMPONENTS, "sdxl"),
    "StableDiffusionXLImg2ImgPipeline": (_SDXL_COMPONENTS, "sdxl"),
    "StableDiffusionXLInpaintPipeline": (_SDXL_COMPONENTS, "sdxl"),
}
_EXPECTED_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL",
                     "text_encoder": ("CLIPTextModel",),
                     "text_encoder_2": ("CLIPTextModelWithProjection",)}


@dataclasses.dataclass
class StableDiffusionModels:
    """The loaded components of one Stable Diffusion folder.

    ``family`` is "sd" (1.x / 2.x) or "sdxl". ``text_encoders`` and ``tokenizers`` hold one entry
    (SD) or two (SDXL, in the order of the folder: CLIP ViT-L, then OpenCLIP bigG with its
    projection). ``vae_info`` has the latent ``scaling_factor`` / ``shift_factor``;
    ``scheduler_config`` is the raw ``scheduler_config.json``; ``index`` is ``model_index.json``."""

    path: str
    family: str
    unet: Any
    unet_params: Any
    unet_config: dict
    vae: Any
    vae_params: Any
    vae_info: dict
    text_encoders: list
    text_encoder_params: list
    tokenizers: list
    scheduler_config: dict
    index: dict

    @property
    def latent_factor(self) -> int:
        """Image pixels per latent, in height and width (8 for every Stable Diffusion)."""
        return self.vae.downsampling_factor

    @property
    def default_size(self) -> int:
        """The image size the UNet was trained for (``sample_size`` x ``latent_factor``)."""
        return int(self.unet_config.get("sample_size", 64)) * self.latent_factor


def read_model_index(path) -> dict:
    """``path/model_index.json``, checked to be a supported pipeline with every component."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory; pass the folder of a diffusers "
                                "Stable Diffusion model (the one holding model_index.json)")
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        hint = (" It looks like one component's folder: pass its parent."
                if os.path.isfile(os.path.join(path, "config.json")) else "")
        raise FileNotFoundError(f"{index_path} does not exist: a diffusers model folder holds "
                                f"model_index.json beside unet/, vae/, text_encoder/, ...{hint}")
    index = read_json_object(index_path)
    class_name = index.get("_class_name")
    if class_name not in PIPELINES:
        raise ValueError(
            f"{index_path} describes a {class_name!r}, which diffusion_jax cannot load: it "
            f"loads {', '.join(PIPELINES)} folders (Stable Diffusion 1.x, 2.x and SDXL "
            "base; the SDXL refiner has no first text encoder). Other architectures (SD3, "
            "Flux, Kandinsky, ...) are not supported yet.")
    if index.get("requires_aesthetics_score"):
        raise ValueError(f"{index_path} sets requires_aesthetics_score (the SDXL refiner's "
                         "conditioning), which diffusion_jax does not implement")
    needed, _ = PIPELINES[class_name]
    for component in needed:
        entry = index.get(component)
        if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[1] is None:
            raise ValueError(f"{index_path} lists no {component!r}, which a {class_name} needs")
        expected = _EXPECTED_CLASSES.get(component)
        if expected is not None and entry[1] not in (
                expected if isinstance(expected, tuple) else (expected,)):
            raise ValueError(f"{index_path}: {component} is a {entry[1]}; diffusion_jax loads "
                             f"{expected} there")
        if not os.path.isdir(os.path.join(path, component)):
            raise FileNotFoundError(f"{path} has no {component}/ folder, which its "
                                    "model_index.json lists; download the whole model folder")
    return index


def describe_folder(path) -> str:
    """One line naming the pipeline in ``path`` (checked as :func:`read_model_index` does)."""
    index = read_model_index(path)
    return f"{index['_class_name']} in {os.fspath(path)}"


def load_stable_diffusion(path, *, dtype=jnp.float32, param_dtype=None, sharding_for=None,
                          attention: str = "xla",
                          components: Optional[tuple] = None) -> StableDiffusionModels:
    """Load every component of the Stable Diffusion folder ``path``.

    Args:
      dtype: computation dtype of the networks (bfloat16 on accelerators).
      param_dtype: the parameters' dtype (default: ``dtype``); each tensor is cast as it is read,
        so bfloat16 halves the memory from the start.
      sharding_for: ``sharding_for(path, shape) -> Sharding`` places each parameter as it is
        read (replicated over a mesh, or split over its ``fsdp`` axis); None: the default
        device.
      attention: the attention kernel of the UNet and text encoders ("xla", "cudnn", "auto").
      components: load only these (e.g. ``("unet", "text_encoder", "tokenizer")`` for
        training); the others are None.
    """
    path = os.fspath(path)
    index = read_model_index(path)
    needed, family = PIPELINES[index["_class_name"]]
    wanted = set(needed if components is None else components)
    param_dtype = dtype if param_dtype is None else param_dtype

    folder = lambda name: os.path.join(path, name)  # noqa: E731
    unet = unet_params = unet_config = vae = vae_params = vae_info = None
    if "unet" in wanted:
        unet, unet_params, unet_config = sd_unet.load_unet(
            folder("unet"), dtype=dtype, param_dtype=param_dtype, sharding_for=sharding_for,
            attention=attention)
    if "vae" in wanted:
        autoencoder_kl.check_plain_latents(autoencoder_kl.read_config(folder("vae")),
                                           folder("vae"))
        vae, vae_params, vae_info = autoencoder_kl.load_vae(
            folder("vae"), dtype=dtype, param_dtype=param_dtype, sharding_for=sharding_for)
    encoders, encoder_params, tokenizers = [], [], []
    for suffix in ("", "_2"):
        if "text_encoder" + suffix in needed and "text_encoder" + suffix in wanted:
            module, params, _ = clip_text.load_text_encoder(
                folder("text_encoder" + suffix), dtype=dtype, param_dtype=param_dtype,
                sharding_for=sharding_for, attention=attention)
            encoders.append(module)
            encoder_params.append(params)
        if "tokenizer" + suffix in needed and "tokenizer" + suffix in wanted:
            tokenizers.append(clip_tokenizer.CLIPTokenizer.from_folder(folder("tokenizer" + suffix)))
    scheduler_config = (scheduler.read_scheduler_config(folder("scheduler"))
                        if "scheduler" in wanted else None)
    return StableDiffusionModels(
        path=path, family=family, unet=unet, unet_params=unet_params, unet_config=unet_config,
        vae=vae, vae_params=vae_params, vae_info=vae_info, text_encoders=encoders,
        text_encoder_params=encoder_params, tokenizers=tokenizers,
        scheduler_config=scheduler_config, index=index)
