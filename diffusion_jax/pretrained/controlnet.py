"""Diffusers ``ControlNetModel`` folders -> :class:`diffusion_jax.models.controlnet.ControlNet`.

A Stable Diffusion ControlNet (Zhang et al. 2023) is a copy of its base UNet's conditioning,
``conv_in``, down path and middle block, so its config shares the UNet's keys and its tensors
the UNet's names (:mod:`diffusion_jax.pretrained.sd_unet`), plus its own layers:
``controlnet_cond_embedding.conv_in``, ``.blocks.{j}`` and ``.conv_out`` are our
``control_embedding/conv_in``, ``conv_{j}`` and ``conv_out``; ``controlnet_down_blocks.{i}`` is
``control_down_{i}`` and ``controlnet_mid_block`` is ``control_mid``. Its own config keys:
``conditioning_channels`` (the control image's channels), ``conditioning_embedding_out_channels``
(the control image's encoder, one stride-2 stage per width after the first: control images
``2 ** (len - 1)`` times the latents' size, 8 for Stable Diffusion),
``controlnet_conditioning_channel_order`` ("bgr" reverses the channels) and
``global_pool_conditions`` (residuals averaged over the image).

:func:`controlnet_from_config` builds the module (refusing, by key, what it does not implement),
:func:`load_controlnet` reads the weights tensor by tensor (every tensor must be used), and
:func:`check_fits` says, naming keys and tensors, why a ControlNet does not fit a base UNet.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.controlnet import SHARED_PREFIXES, ControlNet, controlnet_for
from diffusion_jax.models.unet import UNet
from diffusion_jax.pretrained import sd_unet
from diffusion_jax.pretrained.weights import (DictWeights, Source, WeightsFile, listed,
                                              load_tree)

__all__ = ["controlnet_from_config", "load_controlnet", "convert_state_dict", "check_fits",
           "source_for", "CONTROLNET_CLASS"]

CONTROLNET_CLASS = "ControlNetModel"

# The UNet's keys a ControlNetModel config has too, with the values this ControlNet implements.
_REQUIRED = {key: sd_unet._REQUIRED[key] for key in (
    "act_fn", "flip_sin_to_cos", "freq_shift", "resnet_time_scale_shift", "class_embed_type",
    "num_class_embeds", "encoder_hid_dim", "encoder_hid_dim_type", "only_cross_attention",
    "mid_block_type", "downsample_padding", "mid_block_scale_factor", "addition_embed_type")}
_REQUIRED["controlnet_conditioning_channel_order"] = ("rgb", "bgr")
_REQUIRED["global_pool_conditions"] = (False, True)
_KNOWN = {"sample_size", "upcast_attention", "use_linear_projection",
          "addition_embed_type_num_heads",  # as the UNet's: no effect on the function
          "in_channels", "block_out_channels", "layers_per_block", "down_block_types",
          "attention_head_dim", "num_attention_heads", "cross_attention_dim",
          "transformer_layers_per_block", "norm_num_groups", "norm_eps",
          "addition_time_embed_dim", "projection_class_embeddings_input_dim",
          "conditioning_channels", "conditioning_embedding_out_channels"}
_DIFFUSERS_EMBEDDING = (16, 32, 96, 256)  # ControlNetModel's default encoder widths


def controlnet_from_config(config: Mapping[str, Any], dtype=jnp.float32, remat: bool = False,
                           attention: str = "xla") -> ControlNet:
    """The :class:`ControlNet` a diffusers ``ControlNetModel`` ``config.json`` describes.

    Keys missing from the config take diffusers' defaults. A value this ControlNet does not
    implement (class or image-embedding conditioning, another middle block, ...) and a key it
    does not know raise a ValueError naming the key."""
    class_name = config.get("_class_name", CONTROLNET_CLASS)
    if class_name != CONTROLNET_CLASS:
        raise ValueError(f"config _class_name is {class_name!r}, not {CONTROLNET_CLASS!r}: this "
                         "is not a Stable Diffusion ControlNet (pass a ControlNetModel folder)")
    sd_unet.check_config_keys(config, _REQUIRED, _KNOWN, "ControlNet")
    widths = config.get("conditioning_embedding_out_channels", _DIFFUSERS_EMBEDDING)
    if not isinstance(widths, (list, tuple)) or not widths or \
            not all(isinstance(w, int) and w > 0 for w in widths):
        raise ValueError(f"ControlNet config conditioning_embedding_out_channels={widths!r} is "
                         "not supported: give a list of positive widths")
    channels = config.get("conditioning_channels", 3)
    if not isinstance(channels, int) or channels <= 0:
        raise ValueError(f"ControlNet config conditioning_channels={channels!r} must be a "
                         "positive integer")
    attributes = sd_unet.unet_attributes(config, what="ControlNet")
    base = UNet(**attributes, out_channels=int(config.get("in_channels", 4)), remat=remat,
                attention=attention, dtype=dtype)
    return controlnet_for(
        base, embedding_channels=tuple(widths), control_channels=channels,
        pool_residuals=bool(config.get("global_pool_conditions", False)),
        bgr=config.get("controlnet_conditioning_channel_order", "rgb") == "bgr")


def parameter_shapes(model: ControlNet, in_channels: int) -> dict:
    """Flattened parameter path -> shape of ``model`` (nothing is computed)."""
    x, t, kwargs = sd_unet.example_inputs(model, in_channels)
    f = model.control_factor
    control = jax.ShapeDtypeStruct((1, x.shape[1] * f, x.shape[2] * f, model.control_channels),
                                   jnp.float32)
    shapes = jax.eval_shape(
        lambda x, t, c, kw: model.init(jax.random.PRNGKey(0), x, t, c, **kw),
        x, t, control, kwargs)["params"]
    flat = flax.traverse_util.flatten_dict(shapes)
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def source_for(path: tuple, levels: int) -> Source:
    """The diffusers tensors that make our ControlNet parameter ``path``."""
    *modules, leaf = path
    name = "weight" if leaf == "kernel" else leaf
    if modules[0] == "control_embedding":
        layer = modules[1]
        if layer.startswith("conv_") and layer not in ("conv_in", "conv_out"):
            layer = f"blocks.{layer[len('conv_'):]}"
        return Source((f"controlnet_cond_embedding.{layer}.{name}",))
    if modules[0].startswith("control_down_"):
        return Source((f"controlnet_down_blocks.{modules[0][len('control_down_'):]}.{name}",))
    if modules[0] == "control_mid":
        return Source((f"controlnet_mid_block.{name}",))
    return sd_unet.source_for(path, levels)


def _describe(model: ControlNet) -> str:
    return (f"a {CONTROLNET_CLASS} with block widths "
            f"{tuple(model.channels * m for m in model.channel_mult)}, "
            f"{model.num_res_blocks} res blocks per level, attention at levels "
            f"{tuple(model.attention_levels)}, transformer depth {model.transformer_depth}, "
            f"cross-attention width {model.context_dim}, control image encoder widths "
            f"{tuple(model.embedding_channels)} from {model.control_channels} channels")


def convert(weights, model: ControlNet, in_channels: int, dtype=jnp.float32, sharding_for=None):
    """Place ``weights`` (a :class:`WeightsFile` or :class:`DictWeights`) on ``model``'s tree.

    Every tensor must be used: one the ControlNet has no place for is an error."""
    levels = len(model.channel_mult)
    return load_tree(weights, parameter_shapes(model, in_channels),
                     lambda path: source_for(path, levels), what=_describe(model), dtype=dtype,
                     sharding_for=sharding_for)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], model: ControlNet,
                       in_channels: int = 4):
    """A diffusers ``ControlNetModel`` state dict (name -> array) as ``model``'s params."""
    return convert(DictWeights(state_dict), model, in_channels)


def load_controlnet(folder, dtype=jnp.float32, param_dtype=jnp.float32, sharding_for=None,
                    remat: bool = False, attention: str = "xla"):
    """Load a diffusers ``ControlNetModel`` folder: (module, params, config).

    The folder holds ``config.json`` and ``diffusion_pytorch_model(.fp16).safetensors`` (or
    shards with their index). ``dtype``, ``param_dtype`` and ``sharding_for`` are those of
    :func:`diffusion_jax.pretrained.sd_unet.load_unet`."""
    config = sd_unet.read_config(folder, CONTROLNET_CLASS)
    model = controlnet_from_config(config, dtype=dtype, remat=remat, attention=attention)
    weights = WeightsFile.in_folder(folder, sd_unet.WEIGHTS_NAMES, sd_unet.SHARDED_INDEX_NAME,
                                    f"the ControlNet in {os.fspath(folder)}")
    params = convert(weights, model, int(config.get("in_channels", 4)), param_dtype, sharding_for)
    return model, params, config


def _settings(model: UNet, params) -> dict:
    """What a ControlNet must share with its base UNet, by diffusers config key."""
    levels = len(model.channel_mult)

    def per_level(value):
        return list(value) if isinstance(value, (list, tuple)) else [value] * levels

    conv_in = flax.traverse_util.flatten_dict(params).get(("conv_in", "kernel"))
    return {
        "in_channels": None if conv_in is None else int(np.shape(conv_in)[2]),
        "block_out_channels": [model.channels * m for m in model.channel_mult],
        "layers_per_block": model.num_res_blocks,
        "down_block_types (levels with attention)": model.attention_levels,
        "attention_head_dim / num_attention_heads": (per_level(model.num_heads),
                                                     model.head_dim),
        "transformer_layers_per_block": per_level(model.transformer_depth),
        "cross_attention_dim": model.context_dim,
        "norm_num_groups": model.num_groups,
        "norm_eps": model.norm_eps,
        "addition_embed_type (SDXL's text_time: time id and pooled widths)": (
            model.time_ids_dim, model.pooled_dim),
        "mid_block_type": model.mid_attention,
        "resnet_time_scale_shift": model.scale_shift,
        "the timestep embedding": (model.noise_scale, model.noise_shift),
    }


def _shared_shapes(params) -> dict:
    flat = flax.traverse_util.flatten_dict(params)
    return {path: tuple(np.shape(leaf)) for path, leaf in flat.items()
            if path[0].startswith(SHARED_PREFIXES)}


def check_fits(controlnet: ControlNet, controlnet_params, unet: UNet, unet_params, *,
               name: str = "the ControlNet") -> None:
    """Raise a ValueError unless ``controlnet`` was built for the base ``unet``.

    The ControlNet's copy of the encoder must have the base UNet's settings (input channels,
    block widths, res blocks, attention levels and heads, transformer depth, cross-attention
    width, SDXL's added conditioning) and its shared tensors the base's shapes. The message
    names ``name`` (the folder), each differing config key with both values, and the diffusers
    names of the tensors that differ."""
    mine, theirs = _settings(controlnet, controlnet_params), _settings(unet, unet_params)
    differences = [f"{key}: {mine[key]} in the ControlNet, {theirs[key]} in the UNet"
                   for key in mine if mine[key] != theirs[key]]
    levels = len(controlnet.channel_mult)
    mine, theirs = _shared_shapes(controlnet_params), _shared_shapes(unet_params)
    other_shapes = [f"{', '.join(source_for(p, levels).names)} {mine[p]} vs {theirs[p]}"
                    for p in mine if p in theirs and mine[p] != theirs[p]]
    only_here = [", ".join(source_for(p, levels).names) for p in mine if p not in theirs]
    only_there = [", ".join(sd_unet.source_for(p, len(unet.channel_mult)).names)
                  for p in theirs if p not in mine]
    for kind, items in (("tensors of other shapes (ControlNet vs UNet, in Flax layout)",
                         other_shapes),
                        ("tensors the base UNet does not have", only_here),
                        ("tensors of the base UNet the ControlNet does not have", only_there)):
        if items:
            differences.append(f"{kind} ({len(items)}): {listed(items)}")
    if differences:
        raise ValueError(f"{name} was built for another base model; it does not fit this "
                         "pipeline's UNet:\n" + "\n".join(differences)
                         + "\nuse a ControlNet trained for this base model (SD 1.x, SD 2.x and "
                         "SDXL ControlNets are not interchangeable)")
