"""The autoencoders of latent diffusion as configs name them: built, found on disk, checked.

``config.autoencoder`` describes the network a ``task="autoencoder"`` run trains;
``config.latent.autoencoder`` names a trained one for a latent-diffusion run: the workdir of an
autoencoder run, or a diffusers-format ``vae/`` folder (``config.json`` and
``diffusion_pytorch_model.safetensors``). :func:`describe` reads what such a path holds (its
network, never its weights) and says clearly when it is something else; the weights are loaded
by :mod:`diffusion_jax.latent`, which also holds the run's latent scale.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax.numpy as jnp
import ml_collections

from diffusion_jax import configuration, data, defaults
from diffusion_jax.autoencoder_training import AutoencoderTask
from diffusion_jax.models.autoencoder import AutoencoderKL
from diffusion_jax.models.patchgan import PatchDiscriminator
from diffusion_jax.pretrained import autoencoder_kl as diffusers_vae

__all__ = ["build_autoencoder", "build_task", "held_out_source", "AutoencoderSource", "describe", "latent_shape",
           "DIFFUSERS_WEIGHTS", "run_config"]

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
_TRAIN_ONE = ("train one with `python main.py --config=configs/fashion_mnist_autoencoder.py "
              "--workdir=DIR` (a preset with task='autoencoder'), or give a diffusers vae/ folder")


def _dtype(name: str):
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def build_autoencoder(group, channels: int, dtype: str = "float32") -> AutoencoderKL:
    """The :class:`AutoencoderKL` of an ``autoencoder`` config group, for ``channels``-channel images."""
    widths = tuple(int(w) for w in group.block_out_channels)
    if not widths:
        raise configuration.ConfigError("config.autoencoder.block_out_channels is empty; give "
                                        "one width per level, e.g. (64, 128, 128)")
    bad = [w for w in widths if w % group.norm_num_groups]
    if bad:
        raise configuration.ConfigError(
            f"config.autoencoder.block_out_channels={widths}: {bad[0]} is not divisible by "
            f"config.autoencoder.norm_num_groups={group.norm_num_groups} (GroupNorm splits the "
            "channels into that many groups); change one of them")
    return AutoencoderKL(in_channels=channels, out_channels=channels, block_out_channels=widths,
                         layers_per_block=int(group.layers_per_block),
                         latent_channels=int(group.latent_channels),
                         norm_num_groups=int(group.norm_num_groups),
                         mid_attention=bool(group.mid_attention), dtype=_dtype(dtype))


def latent_shape(autoencoder: AutoencoderKL, image_shape, *, where: str) -> tuple:
    """The latent shape of ``image_shape`` images; an error when they do not fit the autoencoder."""
    if len(image_shape) != 3:
        raise configuration.ConfigError(
            f"{where} encodes images, and this data has examples of shape {tuple(image_shape)}")
    height, width, channels = image_shape
    factor = autoencoder.downsampling_factor
    if channels != autoencoder.in_channels:
        raise configuration.ConfigError(
            f"{where} takes {autoencoder.in_channels}-channel images and this data has "
            f"{channels} channel(s); use an autoencoder trained on this data")
    if height % factor or width % factor:
        raise configuration.ConfigError(
            f"{where} downsamples by {factor} and the images are {height}x{width}, not a "
            f"multiple of {factor}; change config.data.resolution (or the autoencoder's levels)")
    return (height // factor, width // factor, autoencoder.latent_channels)


def build_task(config, image_shape) -> AutoencoderTask:
    """The networks a ``task="autoencoder"`` run trains, for images of ``image_shape``."""
    a = config.autoencoder
    autoencoder = build_autoencoder(a, image_shape[-1], config.model.dtype)
    latent_shape(autoencoder, image_shape, where="config.autoencoder")
    discriminator = (PatchDiscriminator(a.disc_layers, a.disc_channels,
                                        dtype=_dtype(config.model.dtype))
                     if a.disc_weight > 0 else None)
    return AutoencoderTask(autoencoder, discriminator)


def held_out_source(config):
    """``(source, split)``: the held-out split (``data.test_split``), else the training split.

    Reconstructions are judged on held-out images where the data has them; a folder of images
    or a TFDS dataset without that split is judged on the images it trains on.
    """
    split = config.data.test_split
    try:
        return configuration.build_source(config.data, split=split), split
    except data.DataError:
        return configuration.build_source(config.data), config.data.split


@dataclasses.dataclass(frozen=True)
class AutoencoderSource:
    """What ``config.latent.autoencoder`` names: where, which kind, its network and settings.

    ``kind`` is ``"run"`` (the workdir of a ``task="autoencoder"`` run, whose ``config`` is the
    run's) or ``"diffusers"`` (a ``vae/`` folder; ``scaling_factor`` and ``shift_factor`` come
    from its config.json).
    """

    path: str
    kind: str
    autoencoder: AutoencoderKL
    config: Any
    scaling_factor: Optional[float] = None
    shift_factor: Optional[float] = None
    image_shape: Optional[tuple] = None  # the images an autoencoder run was trained on

    def fingerprint(self) -> dict:
        """What a latent run records of its autoencoder: the kind and the network's settings."""
        a = self.autoencoder
        return {"kind": self.kind, "block_out_channels": list(a.block_out_channels),
                "layers_per_block": a.layers_per_block, "latent_channels": a.latent_channels,
                "in_channels": a.in_channels}


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise configuration.ConfigError(f"{what}: cannot read {path}: {err}") from err


def describe(path: str, dtype: str = "float32") -> AutoencoderSource:
    """What the autoencoder path of ``config.latent.autoencoder`` holds, or a clear error."""
    where = f"config.latent.autoencoder={path!r}"
    if not os.path.isdir(path):
        raise configuration.ConfigError(f"{where} is not a folder; {_TRAIN_ONE}")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise configuration.ConfigError(
            f"{where} has no config.json, so it is neither an autoencoder run's workdir nor a "
            f"diffusers vae/ folder; {_TRAIN_ONE}")
    raw = _read_json(config_path, where)
    if "_class_name" in raw:  # a diffusers folder
        if raw["_class_name"] != "AutoencoderKL":
            raise configuration.ConfigError(
                f"{where} holds a diffusers {raw['_class_name']}, not an AutoencoderKL; point it "
                "at the model's vae/ folder")
        try:
            autoencoder = diffusers_vae.autoencoder_from_config(raw, dtype=_dtype(dtype))
        except ValueError as err:
            raise configuration.ConfigError(f"{where}: {err}") from err
        try:
            diffusers_vae.check_plain_latents(raw, where)
        except ValueError as err:
            raise configuration.ConfigError(str(err)) from err
        # A config without scaling_factor means diffusers' default, as diffusers reads it.
        return AutoencoderSource(path, "diffusers", autoencoder, raw,
                                 raw.get("scaling_factor", 0.18215), raw.get("shift_factor"))
    return _describe_run(path, raw, where, dtype)


def _describe_run(path: str, raw: dict, where: str, dtype: str) -> AutoencoderSource:
    """An autoencoder run's workdir (its config.json read as written)."""
    task = raw.get("task", "diffusion")
    if task != "autoencoder":
        latent = (raw.get("latent") or {}).get("autoencoder")
        what = "a latent-diffusion run" if latent else "a pixel-space diffusion run"
        raise configuration.ConfigError(
            f"{where} is the workdir of {what} (task={task!r}), not of an autoencoder; {_TRAIN_ONE}")
    if not os.path.isdir(os.path.join(path, "checkpoints")):
        raise configuration.ConfigError(
            f"{where} is an autoencoder run without checkpoints (it has not trained yet); train "
            f"it first with `python main.py --config=... --workdir={path}`")
    config = run_config(raw, where)
    shape = _image_shape(path, config)
    return AutoencoderSource(path, "run", build_autoencoder(config.autoencoder, shape[-1], dtype),
                             config, image_shape=shape)


def run_config(raw: dict, where: str):
    """A run's config.json over today's defaults: keys added since take their default values."""
    config = defaults.get_config()

    def merge(node, values, prefix):
        for key, value in values.items():
            if key not in node:
                raise configuration.ConfigError(
                    f"{where}: its config.json has the key {prefix}{key}, unknown to this version "
                    "of diffusion_jax (was it written by a newer one?)")
            if isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict):
                with node[key].unlocked():
                    merge(node[key], value, f"{prefix}{key}.")
            else:
                node[key] = tuple(value) if isinstance(value, list) else value

    with config.unlocked():
        merge(config, raw, "")
    return config



def _image_shape(path: str, config) -> tuple:
    """The shape of an autoencoder run's images: its autoencoder.json, else its data's."""
    shapes = os.path.join(path, "autoencoder.json")
    if os.path.isfile(shapes):
        return tuple(_read_json(shapes, f"the autoencoder run {path}")["image_shape"])
    shape, _ = configuration.data_shape(configuration.build_source(config.data))
    return tuple(shape)
