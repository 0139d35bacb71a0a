"""Training runs that start from a pretrained Stable Diffusion folder (``config.pretrained.path``).

The run's denoiser is the folder's UNet with its CLIP text encoder
(:class:`~diffusion_jax.models.clip_conditioned.CLIPConditioned`), captions are tokenized by the
folder's tokenizer, the latents are those of the folder's ``vae/`` (``config.latent.autoencoder``
names it), and the first train state holds the folder's weights, read tensor by tensor straight
into the state's shardings. From then on it is an ordinary run: the same loop, checkpoints,
resume, grids and sampling. Stable Diffusion 1.x and 2.x folders can be fine-tuned; SDXL's
second text encoder and size conditioning are not wired into the loop yet.
"""

from __future__ import annotations

import functools
import os

import flax.traverse_util
import jax.numpy as jnp

from diffusion_jax.models.clip_conditioned import CLIPConditioned
from diffusion_jax.pretrained import clip_text, clip_tokenizer, scheduler, sd_unet
from diffusion_jax.pretrained import stable_diffusion as sd_folder
from diffusion_jax.pretrained.weights import WeightsFile

__all__ = ["check", "build_denoiser", "tokenizer", "initial_params", "fingerprint"]

# Config keys of the folder's components that a checkpoint records (not versions or names).
_UNRECORDED = {"_diffusers_version", "_name_or_path", "transformers_version", "dtype",
               "torch_dtype", "architectures"}


def _folder(path, component):
    return os.path.join(os.fspath(path), component)


@functools.lru_cache(maxsize=8)
def _configs(path):
    index = sd_folder.read_model_index(path)
    unet = sd_unet.read_config(_folder(path, "unet"))
    text = clip_text.read_config(_folder(path, "text_encoder"))
    schedule = scheduler.read_scheduler_config(_folder(path, "scheduler"))
    return index, unet, text, schedule


_SCHEDULE_FIELDS = ("beta_schedule", "beta_start", "beta_end", "num_timesteps",
                    "zero_terminal_snr")


def check(config, schedule) -> None:
    """Raise ValueError naming the key when ``config`` cannot train from its pretrained folder.

    The folder must be a Stable Diffusion 1.x / 2.x one, the latents those of its ``vae/``,
    and ``schedule`` (the config's) and ``config.diffusion.target`` the forward process and
    prediction target its scheduler describes."""
    path = config.pretrained.path
    index, _, _, schedule_config = _configs(path)
    if index["_class_name"] != "StableDiffusionPipeline":
        raise ValueError(f"config.pretrained.path={path!r} holds a {index['_class_name']}; "
                         "training starts from StableDiffusionPipeline folders (SD 1.x, 2.x) "
                         "only so far (--mode=sample runs any supported folder)")
    vae = os.path.realpath(_folder(path, "vae"))
    if os.path.realpath(config.latent.autoencoder or ".") != vae:
        raise ValueError(f"config.latent.autoencoder={config.latent.autoencoder!r}: a run from "
                         f"the pretrained folder works on its latents; set it to {vae!r}")
    plan = scheduler.plan_from_config(schedule_config, method="ddim")
    if config.diffusion.target != plan.prediction:
        raise ValueError(f"config.diffusion.target={config.diffusion.target!r}, but the folder's "
                         f"model predicts {plan.prediction!r} (its scheduler_config.json): set "
                         f"--config.diffusion.target={plan.prediction}")
    theirs = {f: getattr(plan.schedule, f) for f in _SCHEDULE_FIELDS}
    ours = {f: getattr(schedule, f, None) for f in _SCHEDULE_FIELDS}
    if ours != theirs:
        name = "scaled_linear" if theirs["beta_schedule"] == "scaled_linear" else "ddpm_linear"
        raise ValueError(
            f"config.diffusion.schedule={config.diffusion.schedule!r} with schedule_params "
            f"{dict(config.diffusion.schedule_params)} is not the forward process the folder's "
            f"model was trained with ({theirs}, from its scheduler_config.json): use "
            f"diffusion.schedule={name!r} with beta_start, beta_end, num_timesteps and "
            "zero_terminal_snr as listed (in diffusion.schedule_params where they differ from "
            "its defaults)")


@functools.lru_cache(maxsize=8)
def tokenizer(path) -> clip_tokenizer.CLIPTokenizer:
    """The folder's CLIP tokenizer (cached: one per folder)."""
    return clip_tokenizer.CLIPTokenizer.from_folder(_folder(path, "tokenizer"))


def build_denoiser(config) -> CLIPConditioned:
    """The folder's UNet and text encoder as one module, in ``config.model``'s dtype."""
    _, unet_config, text_config, _ = _configs(config.pretrained.path)
    dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
    unet = sd_unet.unet_from_config(unet_config, dtype=dtype, remat=config.model.remat,
                                    attention=config.model.attention)
    encoder = clip_text.text_encoder_from_config(text_config, dtype=dtype,
                                                 attention=config.model.attention)
    null = tuple(int(i) for i in tokenizer(config.pretrained.path)([""])[0])
    return CLIPConditioned(unet, encoder, null, freeze_text=config.text.freeze)


def initial_params(config, model: CLIPConditioned, shardings):
    """The folder's weights as the run's first parameters, each placed in its sharding.

    ``shardings`` is the train state's ``params`` entry of shardings (``{"encoder": ...,
    "denoiser": ...}``); the weights are read tensor by tensor into them, in float32."""
    path = config.pretrained.path
    flat = flax.traverse_util.flatten_dict(shardings)
    place = lambda part: lambda p, shape: flat[(part,) + p]  # noqa: E731
    unet_weights = WeightsFile.in_folder(_folder(path, "unet"), sd_unet.WEIGHTS_NAMES,
                                         sd_unet.SHARDED_INDEX_NAME, "the UNet")
    text_weights = WeightsFile.in_folder(_folder(path, "text_encoder"), clip_text.WEIGHTS_NAMES,
                                         clip_text.SHARDED_INDEX_NAME, "the text encoder")
    in_channels = int(_configs(path)[1].get("in_channels", 4))
    return {"denoiser": sd_unet.convert(unet_weights, model.denoiser, in_channels,
                                        sharding_for=place("denoiser")),
            "encoder": clip_text.convert(text_weights, model.encoder,
                                         what=f"the text encoder of {path}",
                                         sharding_for=place("encoder"))}


def fingerprint(path) -> dict:
    """What a checkpoint records of the folder: its UNet's and text encoder's configs."""
    _, unet_config, text_config, _ = _configs(path)
    keep = lambda c: {k: v for k, v in c.items() if k not in _UNRECORDED}  # noqa: E731
    return {"unet": keep(unet_config), "text_encoder": keep(text_config)}
