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

import json
import os
import re
from typing import Any, Mapping

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.autoencoder import AutoencoderKL

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
_MAX_LISTED = 40  # names listed per kind of problem in an error message


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


def _to_flax(leaf: str, tensor: np.ndarray, expected: tuple[int, ...]) -> np.ndarray:
    """A PyTorch tensor in Flax's layout for a parameter of shape ``expected``."""
    if leaf == "kernel" and len(expected) == 4 and tensor.ndim == 4:
        return np.transpose(tensor, (2, 3, 1, 0))  # [out, in, kh, kw] -> [kh, kw, in, out]
    if leaf == "kernel" and len(expected) == 2:
        if tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
            tensor = tensor[:, :, 0, 0]  # a 1x1 convolution written for a linear layer
        if tensor.ndim == 2:
            return tensor.T
    return tensor


def _parameter_shapes(model: AutoencoderKL) -> dict[tuple[str, ...], tuple[int, ...]]:
    size = model.downsampling_factor
    example = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), example)["params"]
    return {path: tuple(leaf.shape)
            for path, leaf in flax.traverse_util.flatten_dict(shapes).items()}


def _listed(names) -> str:
    names = list(names)
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def convert_state_dict(state_dict: Mapping[str, np.ndarray], model: AutoencoderKL):
    """A diffusers ``AutoencoderKL`` state dict as ``model``'s parameters (nested dict, float32).

    Every tensor must be used and every parameter filled, each with the shape ``model`` expects:
    otherwise a ValueError lists the unused tensors, the missing ones and the shape mismatches.
    The result is what ``model.apply({"params": params}, ...)`` takes."""
    by_name, duplicates = {}, []
    for name in state_dict:
        current = _current_name(name)
        if current in by_name:
            duplicates.append(f"{by_name[current]} and {name}")
        by_name[current] = name
    flat, missing, mismatched = {}, [], []
    for path, shape in _parameter_shapes(model).items():
        name = _torch_name(path)
        if name not in by_name:
            missing.append(name)
            continue
        source = by_name.pop(name)
        value = _to_flax(path[-1], np.asarray(state_dict[source]), shape)
        if tuple(value.shape) != shape:
            mismatched.append(f"{source} {tuple(np.shape(state_dict[source]))} "
                              f"(expected {shape} in Flax layout)")
            continue
        flat[path] = jnp.asarray(value, jnp.float32)
    problems = [f"{what} ({len(items)}): {_listed(items)}"
                for what, items in (("tensors the model does not use", sorted(by_name.values())),
                                    ("parameters missing from the state dict", missing),
                                    ("shape mismatches", mismatched),
                                    ("tensors given under both old and new names", duplicates))
                if items]
    if problems:
        raise ValueError("the state dict does not fit AutoencoderKL("
                         f"block_out_channels={tuple(model.block_out_channels)}, "
                         f"layers_per_block={model.layers_per_block}, "
                         f"latent_channels={model.latent_channels}, "
                         f"mid_attention={model.mid_attention}, "
                         f"use_quant_conv={model.use_quant_conv}, "
                         f"use_post_quant_conv={model.use_post_quant_conv}); check that the "
                         "config.json belongs to these weights.\n" + "\n".join(problems))
    return flax.traverse_util.unflatten_dict(flat)


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        hint = (f" It holds a vae/ folder: pass {os.path.join(folder, 'vae')!r}."
                if os.path.isfile(os.path.join(folder, "vae", CONFIG_NAME)) else
                " Pass the vae/ folder of a diffusers model, as written by save_pretrained.")
        raise FileNotFoundError(f"{path} does not exist.{hint}")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore the file from the "
                         "model's repository") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object")
    class_name = config.get("_class_name")
    if class_name is not None and class_name != "AutoencoderKL":
        raise ValueError(f"{folder} holds a {class_name}, not an AutoencoderKL (config.json "
                         "_class_name); pass the model's vae/ folder")
    return config


def _read_weights(folder: str) -> dict[str, np.ndarray]:
    # An optional dependency, imported where it is needed: only reading weights files uses it.
    from safetensors.numpy import load_file

    for name in WEIGHTS_NAMES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return load_file(path)
    index = os.path.join(folder, SHARDED_INDEX_NAME)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(load_file(os.path.join(folder, shard)))
        return tensors
    pickled = os.path.isfile(os.path.join(folder, "diffusion_pytorch_model.bin"))
    hint = (" Only diffusion_pytorch_model.bin (a pickle, which is never loaded) is there: "
            "convert it with diffusers (save_pretrained writes safetensors)." if pickled else
            " Download the weights next to config.json.")
    raise FileNotFoundError(f"{folder} has no {WEIGHTS_NAMES[0]} (nor {WEIGHTS_NAMES[1]} or "
                            f"{SHARDED_INDEX_NAME}).{hint}")


def load_vae(folder: str, dtype=jnp.float32):
    """Loads a diffusers ``vae/`` folder: (module, float32 params, info).

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
    params = convert_state_dict(_read_weights(folder), model)
    info = {"scaling_factor": float(config.get("scaling_factor", 0.18215)),
            "shift_factor": config.get("shift_factor"), "config": config}
    return model, params, info
