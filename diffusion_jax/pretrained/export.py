"""This package's networks -> diffusers folders that ``from_pretrained`` loads to the same function.

The inverse of :mod:`~diffusion_jax.pretrained.sd_unet` and
:mod:`~diffusion_jax.pretrained.autoencoder_kl`: every parameter becomes the diffusers tensor(s)
holding it (fused q/k/v kernels split, Dense kernels [in, out] -> [out, in], convolutions HWIO ->
OIHW, transformer projections [out, in, 1, 1] unless ``use_linear_projection``), written with
``safetensors.numpy`` beside a ``config.json`` that rebuilds the network:

* a :class:`~diffusion_jax.models.unet.UNet` with ``context_dim`` -> ``UNet2DConditionModel``
  (``num_classes`` -> ``num_class_embeds``, ``pooled_dim`` -> the "simple_projection" class
  embedding, ``time_ids_dim`` -> SDXL's "text_time"), which
  :func:`~diffusion_jax.pretrained.sd_unet.load_unet` reads back where it takes the config;
* a UNet without text -> ``UNet2DModel``, read back by :func:`load_pixel_unet`;
* an :class:`~diffusion_jax.models.autoencoder.AutoencoderKL` -> ``AutoencoderKL``.

What has no diffusers counterpart is a ValueError naming the setting (docs/export.md lists them).
The diffusers ``timestep`` is ``k = noise_scale * noise_level + timestep_shift``; the default
shift is the UNet's ``noise_shift`` (weights copied as they are), another one is folded into the
first time-embedding layer (a rotation of its sinusoidal features: the same function to float32
round-off). :func:`scheduler_config` describes a schedule and target for the diffusers scheduler
that reproduces them. Folders are written beside the target and renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import uuid
from typing import Any, Mapping, Optional

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import schedules as schedules_lib
from diffusion_jax.models.autoencoder import AutoencoderKL
from diffusion_jax.models.unet import UNet
from diffusion_jax.pretrained import autoencoder_kl, sd_unet
from diffusion_jax.pretrained.weights import (Source, WeightsFile, listed, load_tree,
                                              read_json_object)

__all__ = ["export_unet", "export_pixel_unet", "export_autoencoder", "export_pipeline",
           "scheduler_config", "unet2d_from_config", "load_pixel_unet", "staged_folder",
           "WEIGHTS_NAME", "INFO_NAME"]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INFO_NAME = "diffusion_jax_export.json"  # what the folder holds and how its timesteps read
_ATTENTION_EPS = 1e-6  # the epsilon of the UNet's attention GroupNorms (AttentionBlock, Transformer)
_PIXEL_ATTENTION = {"norm": ("group_norm",), "attention/qkv": ("to_q", "to_k", "to_v"),
                    "attention/out": ("to_out.0",)}
_PIXEL_FIXED = {"center_input_sample": False, "time_embedding_type": "positional",
                "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
                "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
                "upsample_type": "conv", "class_embed_type": None, "time_embedding_dim": None,
                "mid_block_type": "UNetMidBlock2D"}


# Writing folders.
@contextlib.contextmanager
def staged_folder(folder, overwrite: bool = False):
    """Yield a hidden folder beside ``folder``; when the block succeeds it becomes ``folder``.

    An existing non-empty ``folder`` is refused (FileExistsError) unless ``overwrite``; on any
    error the hidden folder is removed and ``folder`` is left as it was."""
    folder = os.path.abspath(os.fspath(folder))
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise FileExistsError(f"{folder} exists and is not a folder; choose another path")
    if os.path.isdir(folder) and os.listdir(folder) and not overwrite:
        raise FileExistsError(f"{folder} exists and is not empty; pass overwrite=True to replace "
                              "it, or choose another path")
    parent, name = os.path.split(folder)
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    os.chmod(stage, 0o755)
    try:
        yield stage
        old = os.path.join(parent, f".{name}.replaced-{uuid.uuid4().hex[:8]}")
        if os.path.isdir(folder):
            os.rename(folder, old)
        try:
            os.rename(stage, folder)
        except OSError:
            if os.path.isdir(old):
                os.rename(old, folder)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _write_json(path, value) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


def _save_component(folder, config: dict, tensors: Mapping[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file  # optional at import time: only writing needs it

    os.makedirs(folder, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
    _write_json(os.path.join(folder, "config.json"), config)


def _flat_numpy(params) -> dict:
    """Flattened path -> float32 host array (bfloat16 parameters widen exactly)."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    out = {}
    for path, value in flat.items():
        value = np.asarray(jax.device_get(value))
        out[path] = value.astype(np.float32) if value.dtype != np.float32 else value
    return out


def _check_tree(flat: Mapping[tuple, np.ndarray], expected: Mapping[tuple, tuple], what: str):
    """Refuse parameters that are not exactly the tree of ``what`` (listing every difference)."""
    extra = sorted("/".join(p) for p in set(flat) - set(expected))
    missing = sorted("/".join(p) for p in set(expected) - set(flat))
    wrong = sorted(f"{'/'.join(p)} {flat[p].shape} (expected {tuple(expected[p])})"
                   for p in set(flat) & set(expected) if flat[p].shape != tuple(expected[p]))
    problems = [f"{kind} ({len(items)}): {listed(items)}" for kind, items in (
        ("parameters no diffusers tensor takes", extra), ("parameters missing", missing),
        ("shape mismatches", wrong)) if items]
    if problems:
        raise ValueError(f"the parameters do not fit {what}:\n" + "\n".join(problems))


def _torch_layout(leaf: str, value: np.ndarray, conv: bool = False) -> np.ndarray:
    """A Flax parameter in PyTorch's layout (the inverse of ``weights.torch_to_flax``)."""
    if leaf == "kernel" and value.ndim == 4:
        return np.transpose(value, (3, 2, 0, 1))
    if leaf == "kernel" and value.ndim == 2:
        return value.T[:, :, None, None] if conv else value.T
    return value


# UNets.
def _refuse_non_unet(model, what: str) -> None:
    if isinstance(model, UNet):
        return
    name = type(model).__name__
    if hasattr(model, "denoiser") and hasattr(model, "encoder"):
        raise ValueError(
            f"{what} takes the denoiser itself, not a {name} (a denoiser with its text encoder): "
            "pass model.denoiser and params['denoiser']. The byte-level text encoder of "
            "captioned runs has no diffusers counterpart and is not exported")
    reasons = {"DiT": "diffusers' DiT transformers embed the timestep with other frequencies "
                      "(downscale_freq_shift=1) and another layout, so no diffusers class "
                      "computes this DiT",
               "MLP": "diffusers has no network for vector data"}
    raise ValueError(f"{what} exports diffusion_jax.models.unet.UNet; a {name} has no diffusers "
                     f"counterpart ({reasons.get(name, 'no diffusers class computes it')})")


def _per_level(value, levels: int) -> tuple:
    return (int(value),) * levels if isinstance(value, int) else tuple(int(v) for v in value)


def _unet_layout(model: UNet, flat: dict, in_channels: Optional[int]) -> dict:
    """The UNet's shape as diffusers configs describe it, checked against its parameters."""
    if ("conv_in", "kernel") not in flat or ("conv_out", "kernel") not in flat:
        raise ValueError("the parameters are not a UNet's (no conv_in / conv_out); pass the "
                         "denoiser's parameters (params['denoiser'] for a text model)")
    levels = len(model.channel_mult)
    widths = tuple(model.channels * int(m) for m in model.channel_mult)
    found_in = flat[("conv_in", "kernel")].shape[2]
    if in_channels is not None and in_channels != found_in:
        raise ValueError(f"in_channels={in_channels}, but conv_in takes {found_in} channels")
    modules = {path[0] for path in flat}
    attention = tuple(f"down_{level}_attn_0" in modules for level in range(levels))
    heads = _per_level(model.num_heads, levels)
    if model.head_dim:
        heads = tuple(max(1, w // model.head_dim) for w in widths)
    layout = dict(levels=levels, widths=widths, attention=attention, heads=heads,
                  mid_attention="mid_attn" in modules, in_channels=int(found_in),
                  out_channels=int(flat[("conv_out", "kernel")].shape[-1]),
                  depth=_per_level(model.transformer_depth, levels))
    canonical = model.clone(attention_levels=tuple(i for i, a in enumerate(attention) if a),
                            mid_attention=layout["mid_attention"], remat=False)
    _check_tree(flat, _unet_shapes(canonical, layout["in_channels"]),
                f"{'a text-conditioned' if model.context_dim else 'a'} UNet with block widths "
                f"{widths} and attention at levels {canonical.attention_levels}")
    return layout


def _unet_shapes(model: UNet, in_channels: int) -> dict:
    """Flattened parameter path -> shape of ``model`` (nothing is computed)."""
    size = 2 ** (len(model.channel_mult) - 1)
    spec = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    kwargs = {}
    if model.num_classes is not None:
        kwargs["labels"] = spec(1, dtype=jnp.int32)
    if model.context_dim is not None:
        kwargs["context"] = spec(1, 1, model.context_dim)
    if model.pooled_dim is not None:
        kwargs["pooled"] = spec(1, model.pooled_dim)
    if model.time_ids_dim is not None:
        kwargs["time_ids"] = spec(1, sd_unet.SDXL_TIME_IDS)
    shapes = jax.eval_shape(lambda x, t, kw: model.init(jax.random.PRNGKey(0), x, t, **kw),
                            spec(1, size, size, in_channels), spec(1), kwargs)["params"]
    return {p: tuple(v.shape) for p, v in flax.traverse_util.flatten_dict(shapes).items()}


def _source(path: tuple, levels: int, pixel: bool) -> Source:
    """The diffusers tensor(s) of the UNet parameter ``path`` (several for a fused kernel)."""
    *modules, leaf = path
    if modules == ["class_embedding"]:
        return Source(("class_embedding.weight",))
    if modules == ["pooled_embedding"]:
        return Source((f"class_embedding.{sd_unet._leaf(leaf)}",))
    try:
        if pixel and ("_attn_" in modules[0] or modules[0] == "mid_attn"):
            names = _PIXEL_ATTENTION["/".join(modules[1:])]
            prefix = sd_unet._block_prefix(modules[0], levels)
            return Source(tuple(f"{prefix}.{n}.{sd_unet._leaf(leaf)}" for n in names),
                          sd_unet._concat_linear if len(names) > 1 else None)
        return sd_unet.source_for(path, levels)
    except (KeyError, ValueError, IndexError) as err:
        raise ValueError(f"no diffusers tensor takes the UNet parameter {'/'.join(path)}") \
            from err


def _fold_time_shift(kernel: np.ndarray, delta: float) -> np.ndarray:
    """``dense_0``'s kernel on features of ``u - delta`` instead of ``u`` (same outputs).

    The features are [cos(u f_j), sin(u f_j)]; for u = k + delta they are a rotation of those
    of k by the angles delta f_j, which moves into the kernel's rows."""
    half = kernel.shape[0] // 2
    freqs = np.exp(-math.log(10_000.0) * np.arange(half, dtype=np.float64) / half)
    cos, sin = np.cos(delta * freqs)[:, None], np.sin(delta * freqs)[:, None]
    w_cos, w_sin = kernel[:half].astype(np.float64), kernel[half:].astype(np.float64)
    folded = np.concatenate([w_cos * cos + w_sin * sin, w_sin * cos - w_cos * sin])
    return folded.astype(np.float32)


def _unet_tensors(flat: dict, levels: int, *, pixel: bool, conv_projection: bool,
                  time_delta: float) -> dict:
    """The state dict of the UNet parameters ``flat``; each tensor is made exactly once."""
    tensors, owner = {}, {}
    for path, value in flat.items():
        source = _source(path, levels, pixel)
        if path == ("noise_embedding", "dense_0", "kernel") and time_delta:
            value = _fold_time_shift(value, time_delta)
        parts = np.split(value, len(source.names), axis=-1) if len(source.names) > 1 else [value]
        for name, part in zip(source.names, parts):
            if name in owner:
                raise ValueError(f"{owner[name]} and {'/'.join(path)} both map to {name}")
            owner[name] = "/".join(path)
            conv = conv_projection and name.endswith((".proj_in.weight", ".proj_out.weight"))
            tensors[name] = _torch_layout(path[-1], part, conv)
    return tensors


def _condition_config(model: UNet, layout: dict, flat: dict) -> dict:
    attention = layout["attention"]
    if not layout["mid_attention"]:
        raise ValueError("mid_attention=False: UNet2DConditionModel's middle block without "
                         "attention has one res block, this UNet's two; no diffusers "
                         "counterpart")
    config = {"_class_name": sd_unet.UNET_CLASS, "in_channels": layout["in_channels"],
              "out_channels": layout["out_channels"], "block_out_channels": list(layout["widths"]),
              "layers_per_block": model.num_res_blocks,
              "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D"
                                   for a in attention],
              "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D"
                                 for a in reversed(attention)],
              "mid_block_type": "UNetMidBlock2DCrossAttn", "attention_head_dim": list(
                  layout["heads"]), "transformer_layers_per_block": list(layout["depth"]),
              "cross_attention_dim": model.context_dim, "norm_num_groups": model.num_groups,
              "norm_eps": model.norm_eps, "flip_sin_to_cos": True, "freq_shift": 0,
              "act_fn": "silu", "center_input_sample": False, "dropout": float(model.dropout),
              "resnet_time_scale_shift": "scale_shift" if model.scale_shift else "default"}
    if model.num_classes is not None:
        if model.pooled_dim is not None and model.time_ids_dim is None:
            raise ValueError("num_classes together with pooled_dim: UNet2DConditionModel has one "
                             "class embedding, for labels or a projected vector, not both")
        config["num_class_embeds"] = model.num_classes + 1
    if model.time_ids_dim is not None:
        config.update(addition_embed_type="text_time", addition_time_embed_dim=model.time_ids_dim,
                      projection_class_embeddings_input_dim=int(
                          flat[("added_embedding_0", "kernel")].shape[0]))
    elif model.pooled_dim is not None:
        config.update(class_embed_type="simple_projection",
                      projection_class_embeddings_input_dim=model.pooled_dim)
    return config


def _pixel_config(model: UNet, layout: dict) -> dict:
    attention = layout["attention"]
    if model.context_dim is not None or model.pooled_dim is not None or model.time_ids_dim:
        raise ValueError("this UNet reads text (context_dim / pooled_dim / time_ids_dim): "
                         "UNet2DModel takes none; export_unet writes a UNet2DConditionModel")
    blocks = [i for i, a in enumerate(attention) if a] + (
        [layout["levels"] - 1] if layout["mid_attention"] else [])
    head_dims = sorted({layout["widths"][i] // layout["heads"][i] for i in blocks})
    if len(head_dims) > 1:
        raise ValueError(
            f"UNet2DModel has one attention_head_dim for all attention blocks, and this UNet's "
            f"attention blocks have head widths {head_dims} (num_heads={model.num_heads} over "
            f"widths {layout['widths']}); a UNet with head_dim set (or one attention width) maps")
    if blocks and not math.isclose(model.norm_eps, _ATTENTION_EPS):
        raise ValueError(
            f"norm_eps={model.norm_eps}: UNet2DModel's attention GroupNorms use norm_eps, and "
            f"this UNet's use {_ATTENTION_EPS} beside res blocks at {model.norm_eps}; no "
            "diffusers counterpart")
    return {"_class_name": "UNet2DModel", **_PIXEL_FIXED, "in_channels": layout["in_channels"],
            "out_channels": layout["out_channels"], "block_out_channels": list(layout["widths"]),
            "layers_per_block": model.num_res_blocks,
            "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
            "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D"
                               for a in reversed(attention)],
            "attention_head_dim": head_dims[0] if head_dims else layout["widths"][-1],
            "norm_num_groups": model.num_groups, "attn_norm_num_groups": model.num_groups,
            "norm_eps": model.norm_eps, "dropout": float(model.dropout),
            "add_attention": layout["mid_attention"],
            "resnet_time_scale_shift": "scale_shift" if model.scale_shift else "default",
            "num_class_embeds": None if model.num_classes is None else model.num_classes + 1}


def _write_unet(folder, model, params, *, conditional: bool, in_channels=None, sample_size=None,
                use_linear_projection=True, upcast_attention=False, timestep_shift=None) -> dict:
    what = "export_unet" if conditional else "export_pixel_unet"
    _refuse_non_unet(model, what)
    if conditional and model.context_dim is None:
        raise ValueError("this UNet has no cross-attention (context_dim=None): "
                         "export_pixel_unet writes it as a UNet2DModel")
    flat = _flat_numpy(params)
    layout = _unet_layout(model, flat, in_channels)
    if conditional:
        config = _condition_config(model, layout, flat)
        config.update(use_linear_projection=bool(use_linear_projection),
                      upcast_attention=bool(upcast_attention))
    else:
        config = _pixel_config(model, layout)
    config["sample_size"] = sample_size
    shift = float(model.noise_shift if timestep_shift is None else timestep_shift)
    tensors = _unet_tensors(flat, layout["levels"], pixel=not conditional,
                            conv_projection=conditional and not use_linear_projection,
                            time_delta=float(model.noise_shift) - shift)
    _save_component(folder, config, tensors)
    return {**config, "_timestep": {"scale": float(model.noise_scale), "shift": shift}}


def export_unet(folder, model: UNet, params, *, in_channels: Optional[int] = None,
                sample_size=None, use_linear_projection: bool = True,
                upcast_attention: bool = False, timestep_shift: Optional[float] = None,
                overwrite: bool = False) -> dict:
    """Write a text-conditioned UNet as a diffusers ``UNet2DConditionModel`` folder.

    ``params`` are the UNet's (``params["denoiser"]`` of a text model); ``in_channels`` (default:
    conv_in's) is checked. ``use_linear_projection=False`` writes the transformer projections as
    SD 1.x's 1x1 convolutions; ``sample_size`` and ``upcast_attention`` are recorded for
    pipelines. The diffusers timestep is ``noise_scale * noise_level + timestep_shift``
    (default ``model.noise_shift``). Returns the config written, with ``"_timestep"`` (its
    scale and shift) added."""
    with staged_folder(folder, overwrite) as stage:
        return _write_unet(stage, model, params, conditional=True, in_channels=in_channels,
                           sample_size=sample_size, use_linear_projection=use_linear_projection,
                           upcast_attention=upcast_attention, timestep_shift=timestep_shift)


def export_pixel_unet(folder, model: UNet, params, *, in_channels: Optional[int] = None,
                      sample_size=None, timestep_shift: Optional[float] = None,
                      overwrite: bool = False) -> dict:
    """Write a UNet without text conditioning as a diffusers ``UNet2DModel`` folder.

    Class labels become ``num_class_embeds = num_classes + 1`` (the last row is the null label of
    guidance; diffusers needs ``class_labels`` on every call). Refused: one head width per
    attention block (``num_heads`` over levels of different widths; ``head_dim`` maps) and
    ``norm_eps`` other than the attention norms' 1e-6. Timesteps and return value as for
    :func:`export_unet`."""
    with staged_folder(folder, overwrite) as stage:
        return _write_unet(stage, model, params, conditional=False, in_channels=in_channels,
                           sample_size=sample_size, timestep_shift=timestep_shift)


def unet2d_from_config(config: Mapping[str, Any], dtype=jnp.float32) -> UNet:
    """The :class:`UNet` of a ``UNet2DModel`` config of the kind :func:`export_pixel_unet` writes.

    Its noise input is diffusers' timestep itself (``noise_scale=1``, ``noise_shift=0``). Other
    values of the fixed keys, and keys it does not know, raise a ValueError naming them."""
    if config.get("_class_name") != "UNet2DModel":
        raise ValueError(f"config _class_name is {config.get('_class_name')!r}, not 'UNet2DModel'")
    for key, value in _PIXEL_FIXED.items():
        if config.get(key, value) != value:
            raise ValueError(f"UNet2DModel config {key}={config[key]!r} is not supported (only "
                             f"{value!r})")
    known = set(_PIXEL_FIXED) | {"in_channels", "out_channels", "block_out_channels",
                                 "layers_per_block", "down_block_types", "up_block_types",
                                 "attention_head_dim", "norm_num_groups", "attn_norm_num_groups",
                                 "norm_eps", "dropout", "add_attention", "num_class_embeds",
                                 "resnet_time_scale_shift", "sample_size", "num_train_timesteps"}
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(f"UNet2DModel config keys {unknown} are not supported")
    widths = [int(w) for w in config["block_out_channels"]]
    down = list(config["down_block_types"])
    attention = tuple(i for i, t in enumerate(down) if t == "AttnDownBlock2D")
    mirrored = ["AttnUpBlock2D" if i in attention else "UpBlock2D"
                for i in reversed(range(len(widths)))]
    if any(t not in ("AttnDownBlock2D", "DownBlock2D") for t in down) or list(
            config["up_block_types"]) != mirrored or len(down) != len(widths):
        raise ValueError(f"UNet2DModel block types {down} / {config['up_block_types']} are not "
                         "supported: (Attn)DownBlock2D per level, mirrored by (Attn)UpBlock2D")
    groups, eps = int(config.get("norm_num_groups", 32)), float(config.get("norm_eps", 1e-5))
    attends = bool(attention) or config.get("add_attention", True)
    if config.get("attn_norm_num_groups", groups) not in (None, groups) or any(
            w % widths[0] for w in widths) or (attends and not math.isclose(eps, _ATTENTION_EPS)):
        raise ValueError("UNet2DModel config: attention groups must equal norm_num_groups, every "
                         "width be a multiple of the first and norm_eps be 1e-6 with attention")
    classes = config.get("num_class_embeds")
    return UNet(channels=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
                num_res_blocks=int(config.get("layers_per_block", 2)), attention_levels=attention,
                head_dim=int(config.get("attention_head_dim") or widths[-1]), dropout=0.0,
                num_classes=None if classes is None else int(classes) - 1,
                out_channels=int(config.get("out_channels", 3)), noise_scale=1.0,
                noise_shift=0.0, scale_shift=config.get("resnet_time_scale_shift") == "scale_shift",
                num_groups=groups, mid_attention=bool(config.get("add_attention", True)),
                norm_eps=eps, dtype=dtype)


def load_pixel_unet(folder, dtype=jnp.float32, param_dtype=jnp.float32):
    """Load a ``UNet2DModel`` folder written by :func:`export_pixel_unet`: (module, params, config)."""
    config = sd_unet.read_config(folder, expected_class="UNet2DModel")
    model = unet2d_from_config(config, dtype=dtype)
    weights = WeightsFile.in_folder(folder, sd_unet.WEIGHTS_NAMES, sd_unet.SHARDED_INDEX_NAME,
                                    "the UNet")
    levels = len(model.channel_mult)
    params = load_tree(weights, _unet_shapes(model, int(config.get("in_channels", 3))),
                       lambda path: _source(path, levels, pixel=True),
                       what=f"a UNet2DModel with block widths {config['block_out_channels']}",
                       dtype=param_dtype)
    return model, params, config


# The autoencoder.
def _write_autoencoder(folder, model: AutoencoderKL, params, *, scaling_factor: float,
                       shift_factor: Optional[float], sample_size) -> dict:
    if not isinstance(model, AutoencoderKL):
        raise ValueError(f"export_autoencoder exports diffusion_jax.models.AutoencoderKL, not a "
                         f"{type(model).__name__} (pass autoencoder_task.autoencoder and "
                         "params['autoencoder'] for an autoencoder run's networks)")
    flat = _flat_numpy(params)
    size = model.downsampling_factor
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32))
    _check_tree(flat, {p: tuple(v.shape) for p, v in
                       flax.traverse_util.flatten_dict(shapes["params"]).items()},
                autoencoder_kl._describe(model))
    levels = len(model.block_out_channels)
    config = {"_class_name": "AutoencoderKL", "in_channels": model.in_channels,
              "out_channels": model.out_channels, "block_out_channels": [
                  int(w) for w in model.block_out_channels],
              "down_block_types": ["DownEncoderBlock2D"] * levels,
              "up_block_types": ["UpDecoderBlock2D"] * levels,
              "layers_per_block": model.layers_per_block, "act_fn": "silu",
              "latent_channels": model.latent_channels, "norm_num_groups": model.norm_num_groups,
              "mid_block_add_attention": model.mid_attention,
              "use_quant_conv": model.use_quant_conv,
              "use_post_quant_conv": model.use_post_quant_conv,
              "scaling_factor": float(scaling_factor),
              "shift_factor": None if shift_factor is None else float(shift_factor),
              "sample_size": sample_size or 32, "force_upcast": True}
    tensors = {autoencoder_kl._torch_name(path): _torch_layout(path[-1], value)
               for path, value in flat.items()}
    _save_component(folder, config, tensors)
    return config


def export_autoencoder(folder, model: AutoencoderKL, params, *, scaling_factor: float = 1.0,
                       shift_factor: Optional[float] = None, sample_size=None,
                       overwrite: bool = False) -> dict:
    """Write an :class:`AutoencoderKL` as a diffusers ``AutoencoderKL`` (``vae/``) folder.

    ``scaling_factor`` (and ``shift_factor``) are what a latent model multiplies the latents by
    (after subtracting the shift): a latent run's scale from its ``latent.json``. Returns the
    config written; :func:`~diffusion_jax.pretrained.autoencoder_kl.load_vae` reads it back."""
    with staged_folder(folder, overwrite) as stage:
        return _write_autoencoder(stage, model, params, scaling_factor=scaling_factor,
                                  shift_factor=shift_factor, sample_size=sample_size)


# Schedules and whole folders.

_DDPM_TARGETS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def scheduler_config(schedule, target: str, *, noise_scale: float = 1000.0,
                     sigma_data: float = 0.5) -> tuple[dict, float]:
    """A diffusers scheduler config for a schedule and prediction target: ``(config, shift)``.

    The scheduler feeds the network ``k = noise_scale * noise_input + shift``, where the noise
    input is our time t (c_noise for ``edm``), so ``noise_scale`` must be the one its
    timesteps imply. DDPM's discrete betas (``ddpm_linear``, ``scaled_linear``, zero terminal
    SNR) with eps, v or x0 and ``noise_scale`` = T -> ``DDPMScheduler`` (shift -1: diffusers'
    timestep k is t = (k + 1) / T); ``edm`` with the edm target and ``noise_scale`` 1 ->
    ``EDMEulerScheduler``; ``rectified_flow`` without shift, flow target and an integer
    ``noise_scale`` -> ``FlowMatchEulerDiscreteScheduler``. Anything else is a ValueError saying
    why no diffusers scheduler reproduces it."""
    schedule = schedules_lib.get(schedule)
    kind = type(schedule).__name__
    if isinstance(schedule, schedules_lib.DiscreteVP):
        if target not in _DDPM_TARGETS:
            raise ValueError(f"target {target!r} on DDPM betas: diffusers' DDPMScheduler "
                             f"predicts {sorted(_DDPM_TARGETS)} only")
        if noise_scale != schedule.num_timesteps:
            raise ValueError(f"noise_scale={noise_scale}: DDPMScheduler feeds the network "
                             f"timesteps 0..{schedule.num_timesteps - 1}, which only "
                             f"noise_scale={schedule.num_timesteps} reads as this schedule's t")
        return {"_class_name": "DDPMScheduler", "num_train_timesteps": schedule.num_timesteps,
                "beta_start": schedule.beta_start, "beta_end": schedule.beta_end,
                "beta_schedule": schedule.beta_schedule, "trained_betas": None,
                "prediction_type": _DDPM_TARGETS[target], "clip_sample": False,
                "thresholding": False, "variance_type": "fixed_small",
                "rescale_betas_zero_snr": bool(schedule.zero_terminal_snr),
                "timestep_spacing": "trailing", "steps_offset": 0}, -1.0
    if isinstance(schedule, schedules_lib.EDM) and target == "edm":
        if noise_scale != 1.0:
            raise ValueError(f"noise_scale={noise_scale}: diffusers' EDM schedulers feed the "
                             "network c_noise = log(sigma) / 4 itself (noise_scale 1)")
        return {"_class_name": "EDMEulerScheduler", "sigma_min": schedule.sigma_min,
                "sigma_max": schedule.sigma_max, "sigma_data": float(sigma_data),
                "sigma_schedule": "karras", "rho": schedule.rho, "num_train_timesteps": 1000,
                "prediction_type": "epsilon", "final_sigmas_type": "zero"}, 0.0
    if isinstance(schedule, schedules_lib.RectifiedFlow) and target == "flow":
        if schedule.shift != 1.0 or noise_scale != int(noise_scale) or noise_scale < 2:
            raise ValueError(f"rectified flow with shift={schedule.shift}, noise_scale="
                             f"{noise_scale}: FlowMatchEulerDiscreteScheduler feeds the network "
                             "T x the shifted sigma, which is T x our t only without a shift "
                             "and for an integer noise_scale T")
        return {"_class_name": "FlowMatchEulerDiscreteScheduler",
                "num_train_timesteps": int(noise_scale), "shift": 1.0,
                "use_dynamic_shifting": False}, 0.0
    reasons = {"Cosine": "diffusers' squaredcos_cap_v2 clips the last beta at 0.999, so its last "
                         "timestep keeps alpha-bar > 0 where this cosine schedule reaches 0",
               "EDM": f"the EDM schedule with the {target!r} target (EDMEulerScheduler "
                      "preconditions as the edm target)",
               "RectifiedFlow": f"rectified flow with the {target!r} target (diffusers' flow "
                                "scheduler steps a velocity: the flow target)"}
    raise ValueError(f"no diffusers scheduler reproduces the {schedule.name!r} schedule ("
                     f"{reasons.get(kind, f'{kind}: no diffusers scheduler has it')})")


def export_pipeline(folder, model: UNet, params, *, schedule=None, target: Optional[str] = None,
                    sigma_data: float = 0.5, autoencoder: Optional[AutoencoderKL] = None,
                    autoencoder_params=None, scaling_factor: float = 1.0,
                    shift_factor: Optional[float] = None, sample_size=None,
                    info: Optional[Mapping[str, Any]] = None, overwrite: bool = False) -> dict:
    """Write a denoiser, its scheduler and its autoencoder as one diffusers model folder.

    ``unet/`` (a ``UNet2DModel``, or a ``UNet2DConditionModel`` for a UNet with
    ``context_dim``), ``scheduler/`` when ``schedule`` and ``target`` are given (see
    :func:`scheduler_config`; the UNet then takes that scheduler's timesteps), ``vae/`` with
    ``autoencoder`` (a latent model; ``sample_size`` is the latents' and ``scaling_factor`` /
    ``shift_factor`` the latent scale and shift), a ``model_index.json`` for diffusers'
    ``DDPMPipeline`` where that pipeline samples the model (unconditional pixel UNet and DDPM
    scheduler), and :data:`INFO_NAME`: what the folder holds, how the timesteps read and
    ``info``. Returns that summary."""
    _refuse_non_unet(model, "export_pipeline")
    try:
        scheduler, shift = (None, None) if schedule is None else scheduler_config(
            schedule, target, noise_scale=float(model.noise_scale), sigma_data=sigma_data)
    except ValueError as err:
        raise ValueError(f"{err}; without a scheduler (schedule=None, or export_run(..., "
                         "scheduler=False)) the networks are written alone") from err
    conditional = model.context_dim is not None
    with staged_folder(folder, overwrite) as stage:
        unet = _write_unet(os.path.join(stage, "unet"), model, params, conditional=conditional,
                           sample_size=sample_size, timestep_shift=shift)
        summary = {"unet": unet["_class_name"], "timestep": unet["_timestep"],
                   "null_label": model.num_classes, "target": target,
                   "scheduler": scheduler and scheduler["_class_name"], "vae": None,
                   "pipeline": None, **dict(info or {})}
        if scheduler is not None:
            os.makedirs(os.path.join(stage, "scheduler"))
            _write_json(os.path.join(stage, "scheduler", "scheduler_config.json"), scheduler)
        if autoencoder is not None:
            image_size = sample_size and (np.asarray(sample_size) *
                                          autoencoder.downsampling_factor).tolist()
            vae = _write_autoencoder(os.path.join(stage, "vae"), autoencoder, autoencoder_params,
                                     scaling_factor=scaling_factor, shift_factor=shift_factor,
                                     sample_size=image_size)
            summary["vae"] = {k: vae[k] for k in ("scaling_factor", "shift_factor")}
        elif not conditional and model.num_classes is None and scheduler is not None and \
                scheduler["_class_name"] == "DDPMScheduler":
            summary["pipeline"] = "DDPMPipeline"
            _write_json(os.path.join(stage, "model_index.json"), {
                "_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                "scheduler": ["diffusers", "DDPMScheduler"]})
        _write_json(os.path.join(stage, INFO_NAME), summary)
    return summary
