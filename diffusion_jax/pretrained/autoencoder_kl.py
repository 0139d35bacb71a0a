"""Diffusers ``AutoencoderKL`` folders -> :class:`diffusion_jax.models.autoencoder.AutoencoderKL`.

A diffusers ``vae/`` folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors``.
:func:`load_vae` reads both (the weights with ``safetensors.numpy``: no torch, no pickle), builds
the module from the config and places every tensor of the state dict on its parameter tree.

The parameter tree mirrors the state dict's names: a module named ``resnets_1`` is diffusers'
``resnets.1``, and ``kernel``/``scale`` are ``weight``. Convolution weights go from PyTorch's
[out, in, kh, kw] to Flax's [kh, kw, in, out], linear weights from [out, in] to [in, out]. The
attention projections are read under their current names (``to_q``, ``to_k``, ``to_v``,
``to_out.0``) or the names of checkpoints written before diffusers 0.14 (``query``, ``key``,
``value``, ``proj_attn``), as linear [out, in] or 1x1-convolution [out, in, 1, 1] weights.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.autoencoder import AutoencoderKL
from diffusion_jax.pretrained.weights import (DictWeights, Source, WeightsFile, listed, load_tree,
                                              read_json_object)

__all__ = ["autoencoder_from_config", "convert_state_dict", "load_vae", "CONFIG_NAME",
           "WEIGHTS_NAMES"]

CONFIG_NAME = "config.json"
# Looked for in this order; the first present is read.
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
SHARDED_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"

# config.json key -> AutoencoderKL field, for the keys that shape the network.
_FIELDS = {"in_channels": "in_channels", "out_channels": "out_channels",
           "block_out_channels": "block_out_channels", "layers_per_block": "layers_per_block",
           "latent_channels": "latent_channels", "norm_num_groups": "norm_num_groups",
           "mid_block_add_attention": "mid_attention", "use_quant_conv": "use_quant_conv",
           "use_post_quant_conv": "use_post_quant_conv"}
# Keys that do not change the network: the latent scaling used by pipelines, tiling and
# precision hints.
_IGNORED = {"sample_size", "scaling_factor", "shift_factor", "latents_mean", "latents_std",
            "force_upcast"}
_ACTIVATIONS = ("silu", "swish")  # the same function in diffusers' get_activation
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v",
                           "proj_attn": "to_out.0"}


def autoencoder_from_config(config: Mapping[str, Any], dtype=jnp.float32) -> AutoencoderKL:
    """The :class:`AutoencoderKL` a diffusers vae ``config.json`` (as a dict) describes.

    Keys missing from the config take diffusers' defaults. Values this module does not implement
    (block types other than DownEncoderBlock2D / UpDecoderBlock2D, an activation other than
    SiLU, another ``_class_name``) and keys it does not know raise a ValueError naming the key."""
    class_name = config.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise ValueError(f"config _class_name is {class_name!r}, not 'AutoencoderKL': this is not "
                         "a diffusers AutoencoderKL config (pass the model's vae/ folder)")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _FIELDS
                     and k not in _IGNORED | {"down_block_types", "up_block_types", "act_fn"})
    if unknown:
        raise ValueError(f"config keys {unknown} are not supported by "
                         "diffusion_jax's AutoencoderKL")
    fields = {field: config[key] for key, field in _FIELDS.items() if key in config}
    widths = tuple(int(w) for w in fields.get("block_out_channels", (64,)))
    fields["block_out_channels"] = widths
    for key, expected in (("down_block_types", "DownEncoderBlock2D"),
                          ("up_block_types", "UpDecoderBlock2D")):
        types = list(config.get(key, [expected] * len(widths)))
        if len(types) != len(widths):
            raise ValueError(f"config {key} has {len(types)} entries but block_out_channels has "
                             f"{len(widths)}")
        if any(t != expected for t in types):
            raise ValueError(f"config {key}={types} is not supported: only {expected} blocks are")
    act_fn = config.get("act_fn", "silu")
    if act_fn not in _ACTIVATIONS:
        raise ValueError(f"config act_fn={act_fn!r} is not supported: only 'silu' is")
    groups = int(fields.get("norm_num_groups", 32))
    if not widths or any(w <= 0 or w % groups for w in widths):
        raise ValueError(f"config block_out_channels={list(widths)} must be positive multiples "
                         f"of norm_num_groups={groups}")
    return AutoencoderKL(**fields, dtype=dtype)


def _torch_name(path: tuple[str, ...]) -> str:
    """The diffusers state-dict name of a Flax parameter path."""
    *modules, leaf = path
    names = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
    return ".".join(names + ["weight" if leaf in ("kernel", "scale") else leaf])


def _current_name(name: str) -> str:
    """A state-dict name with pre-0.14 attention names replaced by the current ones."""
    parts = name.split(".")
    if len(parts) >= 3 and "attentions" in parts and parts[-2] in _LEGACY_ATTENTION_NAMES:
        parts[-2] = _LEGACY_ATTENTION_NAMES[parts[-2]]
    return ".".join(parts)


def _parameter_shapes(model: AutoencoderKL) -> dict[tuple[str, ...], tuple[int, ...]]:
    size = model.downsampling_factor
    example = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), example)["params"]
    return {path: tuple(leaf.shape)
            for path, leaf in flax.traverse_util.flatten_dict(shapes).items()}


def _describe(model: AutoencoderKL) -> str:
    return (f"AutoencoderKL(block_out_channels={tuple(model.block_out_channels)}, "
            f"layers_per_block={model.layers_per_block}, "
            f"latent_channels={model.latent_channels}, mid_attention={model.mid_attention}, "
            f"use_quant_conv={model.use_quant_conv}, "
            f"use_post_quant_conv={model.use_post_quant_conv})")


def _convert(weights, model: AutoencoderKL, dtype=jnp.float32, sharding_for=None):
    """Place the tensors of ``weights`` (a WeightsFile or DictWeights) on ``model``'s tree."""
    by_name, duplicates = {}, []
    for name in weights.names():
        current = _current_name(name)
        if current in by_name:
            duplicates.append(f"{by_name[current]} and {name}")
        by_name[current] = name
    if duplicates:
        raise ValueError(f"{weights.description} holds tensors under both old and new "
                         f"attention names: {listed(duplicates)}")

    def source_for(path):
        name = _torch_name(path)
        return Source((by_name.get(name, name),))

    return load_tree(weights, _parameter_shapes(model), source_for, what=_describe(model),
                     dtype=dtype, sharding_for=sharding_for)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], model: AutoencoderKL):
    """A diffusers ``AutoencoderKL`` state dict as ``model``'s parameters (nested dict, float32).

    Every tensor must be used and every parameter filled, each with the shape ``model`` expects:
    otherwise a ValueError lists the unused tensors, the missing ones and the shape mismatches.
    The result is what ``model.apply({"params": params}, ...)`` takes."""
    return _convert(DictWeights(state_dict), model)


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        hint = (f" It holds a vae/ folder: pass {os.path.join(folder, 'vae')!r}."
                if os.path.isfile(os.path.join(folder, "vae", CONFIG_NAME)) else
                " Pass the vae/ folder of a diffusers model, as written by save_pretrained.")
        raise FileNotFoundError(f"{path} does not exist.{hint}")
    config = read_json_object(path)
    class_name = config.get("_class_name")
    if class_name is not None and class_name != "AutoencoderKL":
        raise ValueError(f"{folder} holds a {class_name}, not an AutoencoderKL (config.json "
                         "_class_name); pass the model's vae/ folder")
    return config


def check_plain_latents(config: Mapping[str, Any], where: str) -> None:
    """Refuse a vae config that normalises latents per channel (``latents_mean`` / ``_std``).

    Only ``scaling_factor`` and ``shift_factor`` are applied to latents in diffusion_jax; a
    ValueError naming ``where`` says so before anything is loaded."""
    for key in ("latents_mean", "latents_std"):
        if config.get(key) is not None:
            raise ValueError(f"{where}: its config.json normalises latents per channel ({key}), "
                             "which diffusion_jax does not support yet; only scaling_factor and "
                             "shift_factor are applied")


def read_config(folder) -> dict:
    """A ``vae/`` folder's ``config.json``, checked to be an AutoencoderKL's."""
    return _read_config(os.fspath(folder))


def load_vae(folder: str, dtype=jnp.float32, param_dtype=jnp.float32, sharding_for=None):
    """Loads a diffusers ``vae/`` folder: (module, params, info).

    ``dtype`` is the module's computation dtype, ``param_dtype`` the parameters' (read tensor by
    tensor and placed by ``sharding_for(path, shape)`` when given, see
    :func:`diffusion_jax.pretrained.weights.load_tree`).

    ``info`` is ``{"scaling_factor": ..., "shift_factor": ... or None, "config": the raw
    config}``: a latent diffusion model works on ``(mean - shift_factor) * scaling_factor``.
    Errors a user can cause (no such folder, no config.json or weights, malformed JSON, a folder
    of another model) raise FileNotFoundError or ValueError saying what to pass instead."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a directory; pass the vae/ folder of a "
                                "diffusers model (config.json + diffusion_pytorch_model."
                                "safetensors)")
    config = _read_config(folder)
    model = autoencoder_from_config(config, dtype=dtype)
    weights = WeightsFile.in_folder(folder, WEIGHTS_NAMES, SHARDED_INDEX_NAME, "the autoencoder")
    params = _convert(weights, model, param_dtype, sharding_for)
    info = {"scaling_factor": float(config.get("scaling_factor", 0.18215)),
            "shift_factor": config.get("shift_factor"), "config": config}
    return model, params, info
