"""Diffusers ``UNet2DConditionModel`` folders -> :class:`diffusion_jax.models.unet.UNet`.

Stable Diffusion 1.x, 2.x and XL's denoisers are the project's UNet with per-level attention,
heads and transformer depth, GroupNorm epsilon 1e-5, diffusers' timestep k = 1000 t - 1 as the
noise input and, for SDXL, the "text_time" added conditioning. :func:`unet_from_config` builds
the module a ``unet/config.json`` describes (refusing, by key, anything it does not implement),
:func:`load_unet` reads the weights tensor by tensor onto it. The key checks
(:func:`check_config_keys`), the down path's attributes (:func:`unet_attributes`) and the
tensor names (:func:`source_for`) also serve ControlNet folders
(:mod:`diffusion_jax.pretrained.controlnet`).

Names: diffusers' ``down_blocks.{l}.resnets.{b}`` is our ``down_{l}_res_{b}`` (``norm1, conv1,
time_emb_proj, norm2, conv2, conv_shortcut`` -> ``norm_0, conv_0, emb, norm_1, conv_1, skip``),
``down_blocks.{l}.attentions.{b}`` is ``down_{l}_attn_{b}``, ``up_blocks.{i}`` is level
``L - 1 - i``, the transformer blocks' separate ``to_q, to_k, to_v`` are concatenated into our
fused ``qkv`` (self-attention) and ``key_value`` (cross-attention) projections, and 1x1
convolution projections (SD 1.x) and linear ones (SD 2.x, XL) both fill our Dense layers.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.unet import UNet
from diffusion_jax.pretrained.weights import (DictWeights, Source, WeightsFile, load_tree,
                                              read_json_object)

__all__ = ["unet_from_config", "unet_attributes", "check_config_keys", "load_unet",
           "convert_state_dict", "read_config", "source_for", "parameter_shapes",
           "example_inputs", "UNET_CLASS", "WEIGHTS_NAMES", "SHARDED_INDEX_NAME"]

UNET_CLASS = "UNet2DConditionModel"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
SHARDED_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"

# Keys whose value must be the one given (diffusers' default) for the network to be ours.
_REQUIRED = {
    "act_fn": ("silu", "swish"),
    "center_input_sample": (False,),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "time_embedding_type": ("positional",),
    "resnet_time_scale_shift": ("default",),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1, 1.0),
    "addition_embed_type": (None, "text_time"),
}
# Keys that do not change the function computed (sizes pipelines default to, training dropout,
# attention precision and projection layout, which both map onto our Dense layers).
_IGNORED = {"sample_size", "dropout", "upcast_attention", "use_linear_projection",
            "addition_embed_type_num_heads"}
_SHAPING = {"in_channels", "out_channels", "block_out_channels", "layers_per_block",
            "down_block_types", "up_block_types", "attention_head_dim", "num_attention_heads",
            "cross_attention_dim", "transformer_layers_per_block", "norm_num_groups",
            "norm_eps", "addition_time_embed_dim", "projection_class_embeddings_input_dim"}
# SDXL base's time ids: original size (2), crop offset (2), target size (2).
SDXL_TIME_IDS = 6
# Down block types -> whether the level has (cross-)attention.
_DOWN_KINDS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}


def _per_level(config, key, levels, default):
    value = config.get(key, default)
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ValueError(f"config {key}={list(value)} needs one entry per level ({levels})")
        return tuple(int(v) for v in value)
    return (int(value),) * levels


def _same_for_every_level(config, key, default, what="UNet"):
    """A value diffusers allows per level, where this UNet needs one for all levels."""
    value = config.get(key, default)
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"{what} config {key}={list(value)}: different values per level "
                             "are not supported")
        value = value[0]
    return value


def check_config_keys(config: Mapping[str, Any], required: Mapping[str, tuple], known,
                      what: str) -> None:
    """Refuse a config key this package does not know, or a value it does not implement.

    A key in neither ``required`` nor ``known``, or a ``required`` key whose value is not one
    of those allowed (a missing key takes the first), is a ValueError naming ``what`` and the
    key."""
    unknown = sorted(k for k in config if not k.startswith("_")
                     and k not in required and k not in known)
    if unknown:
        raise ValueError(f"{what} config keys {unknown} are not supported by diffusion_jax")
    for key, allowed in required.items():
        value = config.get(key, allowed[0])
        if value not in allowed:
            raise ValueError(f"{what} config {key}={value!r} is not supported (only "
                             f"{' or '.join(repr(a) for a in allowed)})")


def unet_attributes(config: Mapping[str, Any], what: str = "UNet") -> dict:
    """The :class:`UNet` attributes of a config's down path, middle block and conditioning.

    Everything but the up path and the output, which a ControlNet's config shares with its base
    UNet's: widths, res blocks, attention levels, heads, depth, cross-attention width, groups,
    epsilon and SDXL's "text_time" added conditioning. Errors name ``what`` and the key."""
    widths = tuple(int(w) for w in config.get("block_out_channels", (320, 640, 1280, 1280)))
    levels = len(widths)
    if any(w % widths[0] for w in widths):
        raise ValueError(f"{what} config block_out_channels={list(widths)}: every width must be "
                         "a multiple of the first")
    down = list(config.get("down_block_types", ["CrossAttnDownBlock2D"] * (levels - 1)
                           + ["DownBlock2D"]))
    if len(down) != levels or any(t not in _DOWN_KINDS for t in down):
        raise ValueError(f"{what} config down_block_types={down} is not supported: one of "
                         f"{sorted(_DOWN_KINDS)} per level ({levels})")
    layers = _same_for_every_level(config, "layers_per_block", 2, what)
    # diffusers' "attention_head_dim" of these models is, by a historical misnomer, the number
    # of heads; num_attention_heads, where given, says so directly.
    heads = _per_level(config, "num_attention_heads", levels, None) or _per_level(
        config, "attention_head_dim", levels, 8)
    depth = _per_level(config, "transformer_layers_per_block", levels, 1)
    context_dim = _same_for_every_level(config, "cross_attention_dim", 1280, what)
    groups = int(config.get("norm_num_groups", 32))
    if any(w % groups for w in widths):
        raise ValueError(f"{what} config block_out_channels={list(widths)} must be multiples of "
                         f"norm_num_groups={groups}")
    extra = {}
    if config.get("addition_embed_type") == "text_time":
        time_dim = int(config.get("addition_time_embed_dim") or 0)
        total = int(config.get("projection_class_embeddings_input_dim") or 0)
        pooled_dim = total - SDXL_TIME_IDS * time_dim
        if time_dim <= 0 or pooled_dim <= 0:
            raise ValueError(
                f"{what} config addition_embed_type='text_time' needs addition_time_embed_dim and "
                f"projection_class_embeddings_input_dim = pooled width + {SDXL_TIME_IDS} x "
                f"addition_time_embed_dim (SDXL base), got {time_dim} and {total}")
        extra = dict(time_ids_dim=time_dim, pooled_dim=pooled_dim)
    return dict(channels=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
                num_res_blocks=int(layers), attention_levels=tuple(
                    i for i, t in enumerate(down) if _DOWN_KINDS[t]),
                num_heads=heads, transformer_depth=depth, dropout=0.0, num_groups=groups,
                context_dim=int(context_dim), norm_eps=float(config.get("norm_eps", 1e-5)),
                noise_scale=1000.0, noise_shift=-1.0, mid_attention=True, **extra)


def unet_from_config(config: Mapping[str, Any], dtype=jnp.float32, remat: bool = False,
                     attention: str = "xla") -> UNet:
    """The :class:`UNet` a diffusers ``UNet2DConditionModel`` ``config.json`` describes.

    Keys missing from the config take diffusers' defaults. A value this UNet does not implement
    (another block type, class or image-embedding conditioning, a custom time embedding, ...),
    and a key it does not know, raise a ValueError naming the key."""
    class_name = config.get("_class_name", UNET_CLASS)
    if class_name != UNET_CLASS:
        raise ValueError(f"config _class_name is {class_name!r}, not {UNET_CLASS!r}: this is not "
                         "a Stable Diffusion UNet (pass the model's unet/ folder)")
    check_config_keys(config, _REQUIRED, _IGNORED | _SHAPING, "UNet")
    attributes = unet_attributes(config)
    levels = len(attributes["channel_mult"])
    down = list(config.get("down_block_types", ["CrossAttnDownBlock2D"] * (levels - 1)
                           + ["DownBlock2D"]))
    up = list(config.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1)))
    mirrored = ["CrossAttnUpBlock2D" if _DOWN_KINDS[t] else "UpBlock2D" for t in reversed(down)]
    if up != mirrored:
        raise ValueError(f"UNet config up_block_types={up} must mirror down_block_types "
                         f"(expected {mirrored})")
    return UNet(**attributes, out_channels=int(config.get("out_channels", 4)), remat=remat,
                attention=attention, dtype=dtype)


def example_inputs(model: UNet, in_channels: int):
    """``(x, t, kwargs)``: the smallest inputs of ``model``, as shapes (for ``jax.eval_shape``)."""
    size = 2 ** (len(model.channel_mult) - 1)
    x = jax.ShapeDtypeStruct((1, size, size, in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    kwargs = dict(context=jax.ShapeDtypeStruct((1, 1, model.context_dim), jnp.float32))
    if model.time_ids_dim is not None:
        kwargs.update(pooled=jax.ShapeDtypeStruct((1, model.pooled_dim), jnp.float32),
                      time_ids=jax.ShapeDtypeStruct((1, SDXL_TIME_IDS), jnp.float32))
    return x, t, kwargs


def parameter_shapes(model: UNet, in_channels: int) -> dict:
    """Flattened parameter path -> shape of ``model`` (nothing is computed)."""
    x, t, kwargs = example_inputs(model, in_channels)
    shapes = jax.eval_shape(lambda x, t, kw: model.init(jax.random.PRNGKey(0), x, t, **kw),
                            x, t, kwargs)["params"]
    return {path: tuple(leaf.shape) for path, leaf in flax.traverse_util.flatten_dict(shapes).items()}


_RES = {"norm_0": "norm1", "conv_0": "conv1", "emb": "time_emb_proj", "norm_1": "norm2",
        "conv_1": "conv2", "skip": "conv_shortcut"}
_BLOCK = {"norm_0": "norm1", "norm_1": "norm2", "norm_2": "norm3",
          "feed_forward/proj_in": "ff.net.0.proj", "feed_forward/proj_out": "ff.net.2",
          "self_attention/out": "attn1.to_out.0", "cross_attention/out": "attn2.to_out.0",
          "cross_attention/query": "attn2.to_q"}
_FUSED = {"self_attention/qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
          "cross_attention/key_value": ("attn2.to_k", "attn2.to_v")}
_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out",
        "noise_embedding/dense_0": "time_embedding.linear_1",
        "noise_embedding/dense_1": "time_embedding.linear_2",
        "added_embedding_0": "add_embedding.linear_1",
        "added_embedding_1": "add_embedding.linear_2"}


def _leaf(leaf: str) -> str:
    return "weight" if leaf in ("kernel", "scale") else leaf


def _concat_linear(tensors):
    """[out_i, in] (or [out_i, in, 1, 1]) weights or [out_i] biases -> one Flax [in, sum out_i]."""
    parts = [t.reshape(t.shape[0], -1).T if t.ndim > 1 else t for t in tensors]
    return np.concatenate(parts, axis=-1)


def _block_prefix(module: str, levels: int) -> str:
    """Our block name (``down_1_res_0``, ``mid_attn``, ``up_2_upsample``) as diffusers'."""
    if module.startswith("mid_"):
        kind, index = module[4:].split("_") if module != "mid_attn" else ("attn", "0")
        return f"mid_block.{'resnets' if kind == 'res' else 'attentions'}.{index}"
    match = re.fullmatch(r"(down|up)_(\d+)_(res|attn|downsample|upsample)(?:_(\d+))?", module)
    if match is None:
        raise ValueError(f"no diffusers name for UNet module {module!r}")
    side, level, kind, index = match.groups()
    block = int(level) if side == "down" else levels - 1 - int(level)
    if kind in ("downsample", "upsample"):
        return f"{side}_blocks.{block}.{kind}rs.0.conv"
    return f"{side}_blocks.{block}.{'resnets' if kind == 'res' else 'attentions'}.{index}"


def source_for(path: tuple, levels: int) -> Source:
    """The diffusers tensors that make our parameter ``path``."""
    *modules, leaf = path
    joined = "/".join(modules)
    if joined in _TOP:
        return Source((f"{_TOP[joined]}.{_leaf(leaf)}",))
    prefix = _block_prefix(modules[0], levels)
    rest = modules[1:]
    if not rest:  # a downsample / upsample convolution
        return Source((f"{prefix}.{_leaf(leaf)}",))
    if "_res_" in modules[0] or modules[0].startswith("mid_res"):
        return Source((f"{prefix}.{_RES[rest[0]]}.{_leaf(leaf)}",))
    if rest[0] in ("norm", "proj_in", "proj_out"):
        return Source((f"{prefix}.{rest[0]}.{_leaf(leaf)}",))
    block = re.fullmatch(r"block_(\d+)", rest[0])
    inner = "/".join(rest[1:])
    if block is None or (inner not in _BLOCK and inner not in _FUSED):
        raise ValueError(f"no diffusers name for UNet parameter {'/'.join(path)}")
    prefix = f"{prefix}.transformer_blocks.{block.group(1)}"
    if inner in _FUSED:
        return Source(tuple(f"{prefix}.{name}.{_leaf(leaf)}" for name in _FUSED[inner]),
                      _concat_linear)
    return Source((f"{prefix}.{_BLOCK[inner]}.{_leaf(leaf)}",))


def _describe(model: UNet) -> str:
    return (f"a {UNET_CLASS} with block widths "
            f"{tuple(model.channels * m for m in model.channel_mult)}, "
            f"{model.num_res_blocks} res blocks per level, attention at levels "
            f"{tuple(model.attention_levels)}, transformer depth {model.transformer_depth}, "
            f"cross-attention width {model.context_dim}")


def convert(weights, model: UNet, in_channels: int, dtype=jnp.float32, sharding_for=None):
    """Place ``weights`` (a :class:`WeightsFile` or :class:`DictWeights`) on ``model``'s tree."""
    levels = len(model.channel_mult)
    return load_tree(weights, parameter_shapes(model, in_channels),
                     lambda path: source_for(path, levels), what=_describe(model), dtype=dtype,
                     sharding_for=sharding_for)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], model: UNet, in_channels: int = 4):
    """A diffusers ``UNet2DConditionModel`` state dict (name -> array) as ``model``'s params."""
    return convert(DictWeights(state_dict), model, in_channels)


def read_config(folder, expected_class: str = UNET_CLASS) -> dict:
    """``folder/config.json`` as a dict, with errors that name the file and what to pass."""
    folder = os.fspath(folder)
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a directory")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; a diffusers component folder holds "
                                "config.json beside its weights")
    config = read_json_object(path)
    found = config.get("_class_name", expected_class)
    if found != expected_class:
        raise ValueError(f"{path} describes a {found}, not a {expected_class}")
    return config


def load_unet(folder, dtype=jnp.float32, param_dtype=jnp.float32, sharding_for=None,
              remat: bool = False, attention: str = "xla"):
    """Load a diffusers ``unet/`` folder: (module, params, config).

    ``dtype`` is the computation dtype, ``param_dtype`` the parameters' (bfloat16 halves the
    memory); ``sharding_for(path, shape)`` places each parameter as it is read (see
    :func:`diffusion_jax.pretrained.weights.load_tree`)."""
    config = read_config(folder)
    model = unet_from_config(config, dtype=dtype, remat=remat, attention=attention)
    weights = WeightsFile.in_folder(folder, WEIGHTS_NAMES, SHARDED_INDEX_NAME, "the UNet")
    params = convert(weights, model, int(config.get("in_channels", 4)), param_dtype, sharding_for)
    return model, params, config
