"""Stable Diffusion LoRA files (diffusers/PEFT and kohya layouts) <-> :class:`lora.Adapter` s.

:func:`load_lora` reads a ``.safetensors`` LoRA onto the UNet and text encoder(s) of a
:class:`~diffusion_jax.pretrained.stable_diffusion.StableDiffusionModels`, in either layout:

- diffusers/PEFT, as ``save_lora_weights`` writes it: ``unet.<module>.lora_A.weight`` /
  ``lora_B.weight`` and ``text_encoder[_2].[text_model.]<module>.lora_A.weight``, with rank and
  alpha in the ``lora_adapter_metadata`` JSON of the file's metadata (``unet.r``,
  ``unet.lora_alpha``, ``unet.rank_pattern``, ``unet.alpha_pattern``, ``unet.use_rslora``);
  without it, alpha = rank (scale 1), as diffusers reads such files. Older spellings
  (``.lora.down.weight``, ``.lora_linear_layer.up.weight``, ``processor.to_q_lora.down.weight``)
  and per-module ``<module>.alpha`` tensors are read too; keys without a component prefix are
  UNet layers (``UNet2DConditionModel.save_lora_adapter``).
- kohya: ``lora_unet_<module with _ for .>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``,
  ``lora_te_`` (``lora_te1_``) and SDXL's ``lora_te2_`` for the text encoders; UNet modules in
  diffusers' names or in the original (SGM) ones of kohya's SDXL networks (``input_blocks_4_1_``,
  ``middle_block_1_``, ``output_blocks_0_1_``). A missing alpha (or 0) means alpha = rank.

Every key must be used: a key of another kind, for a layer the model lacks, a half without its
other half or a tensor whose shape does not fit its layer is a ValueError naming it. Our UNet fuses
to_q, to_k, to_v into one ``qkv`` kernel (to_k, to_v into ``key_value``): their factors are
stacked exactly, ``down`` = [A_q A_k A_v] and ``up`` block-diagonal (rank r_q + r_k + r_v).
:func:`save_lora` writes the PEFT layout with the metadata diffusers' ``load_lora_weights``
reads rank and alpha from, splitting a fused kernel's ``up`` columns per module (with the shared
``down``, or only its own rows when the blocks are disjoint, as after loading a PEFT file).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
import re
import tempfile
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import lora
from diffusion_jax.pretrained import clip_text, sd_unet
from diffusion_jax.pretrained.weights import listed, read_bfloat16

__all__ = ["StableDiffusionLora", "Layer", "Layout", "layout", "lora_file", "read_lora",
           "convert_lora", "load_lora", "save_lora", "merge_into", "WEIGHT_NAME"]

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name in a folder
METADATA_KEY = "lora_adapter_metadata"
_MAX_PROBLEMS = 40  # listed per kind in an error
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_TEXT_MODEL = "text_model."
_KOHYA = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
          "lora_te2_": "text_encoder_2"}
_KOHYA_SUFFIX = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}
# diffusers-named keys: "<component>.<module>.<suffix>" -> factor.
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora.down.weight": "A",
             ".lora.up.weight": "B", ".lora_linear_layer.down.weight": "A",
             ".lora_linear_layer.up.weight": "B", ".alpha": "alpha"}
# diffusers' attention-processor files: "<attention>.processor.to_q_lora.down.weight".
_PROCESSOR = re.compile(r"^(.*?)(?:\.processor)?\.to_(q|k|v|out)_lora\.(down|up)\.weight$")
_PROCESSOR_MODULES = {"unet": {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"},
                      "text": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}}


@functools.partial(jax.tree_util.register_dataclass, data_fields=["unet", "text_encoders"],
                   meta_fields=[])
@dataclasses.dataclass
class StableDiffusionLora:
    """One LoRA of a Stable Diffusion model: an adapter (or None) per network.

    ``unet`` is keyed by our UNet's kernel paths, ``text_encoders[i]`` by the paths of
    ``models.text_encoders[i]`` (one entry per encoder of the model). A pytree: its factors are
    the leaves, so a pipeline passes it to its compiled program as data."""

    unet: Optional[lora.Adapter]
    text_encoders: list

    def components(self) -> dict:
        """Component name ("unet", "text_encoder", "text_encoder_2") -> adapter, if present."""
        found = {"unet": self.unet} if self.unet is not None else {}
        found.update({name: a for name, a in zip(TEXT_ENCODERS, self.text_encoders)
                      if a is not None})
        return found


@dataclasses.dataclass(frozen=True)
class Layer:
    """One module a LoRA file can name, and the columns of our kernel it fills.

    ``module`` is diffusers' / transformers' name (text encoders without ``text_model.``),
    ``path`` our kernel's "/"-joined path, ``shape`` that kernel's shape; the module is its
    output columns ``start : start + width``. ``conv`` is the module's torch kernel size when it
    is a Conv2d (its LoRA factors are 4-D), else None."""

    component: str
    module: str
    path: str
    shape: tuple
    start: int
    width: int
    conv: Optional[tuple]

    def torch_shapes(self, rank) -> tuple:
        """The (lora_A, lora_B) shapes PEFT gives this module at ``rank``."""
        fan_in = self.shape[-2]
        if self.conv is None:
            return (rank, fan_in), (self.width, rank)
        return (rank, fan_in) + self.conv, (self.width, rank, 1, 1)


@dataclasses.dataclass
class Layout:
    """Every LoRA-able module of one model: component -> module name -> :class:`Layer`."""

    components: dict
    kohya: dict  # kohya name ("lora_unet_down_blocks_0_...") -> (component, module)

    def by_path(self, component: str) -> dict:
        """Our kernel path -> its layers, in column order."""
        grouped = collections.defaultdict(list)
        for layer in self.components.get(component, {}).values():
            grouped[layer.path].append(layer)
        return {p: sorted(layers, key=lambda l: l.start) for p, layers in grouped.items()}


def _unet_layers(unet, params, config) -> dict:
    levels = len(unet.channel_mult)
    conv_projections = not (config or {}).get("use_linear_projection", False)
    layers = {}
    for path, shape in lora.kernel_paths(params).items():
        names = sd_unet.source_for(tuple(path.split("/")), levels).names
        width = shape[-1] // len(names)
        for i, name in enumerate(names):
            module = name[:-len(".weight")]
            conv = tuple(shape[:2]) if len(shape) == 4 else (
                (1, 1) if conv_projections and module.endswith((".proj_in", ".proj_out"))
                and ".attentions." in module else None)
            layers[module] = Layer("unet", module, path, shape, i * width, width, conv)
    return layers


def _text_layers(component: str, params) -> dict:
    layers = {}
    for path, shape in lora.kernel_paths(params).items():
        module = clip_text._state_dict_name(tuple(path.split("/")), "")[:-len(".weight")]
        layers[module] = Layer(component, module, path, shape, 0, shape[-1], None)
    return layers


def _sgm_name(module: str, unet) -> Optional[str]:
    """The original (SGM / LDM) name of a diffusers UNet module, as kohya's SDXL files use."""
    n, levels = unet.num_res_blocks, len(unet.channel_mult)
    attention = set(unet.attention_levels or ())
    resnet = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
              "conv_shortcut": "skip_connection"}
    top = {"conv_in": "input_blocks.0.0", "conv_out": "out.2",
           "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    if module in top:
        return top[module]

    def inner(kind, rest):
        return f"0.{resnet.get(rest, rest)}" if kind == "resnets" else f"1.{rest}"

    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
        return f"input_blocks.{1 + int(m[1]) * (n + 1) + int(m[3])}.{inner(m[2], m[4])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        return f"input_blocks.{1 + int(m[1]) * (n + 1) + n}.0.op"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", module):
        index = 1 if m[1] == "attentions" else 2 * int(m[2])
        return f"middle_block.{index}.{resnet.get(m[3], m[3]) if m[1] == 'resnets' else m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
        return f"output_blocks.{int(m[1]) * (n + 1) + int(m[3])}.{inner(m[2], m[4])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
        has_attention = levels - 1 - int(m[1]) in attention
        return f"output_blocks.{int(m[1]) * (n + 1) + n}.{2 if has_attention else 1}.conv"
    return None


def layout(models) -> Layout:
    """The LoRA-able modules of a :class:`StableDiffusionModels` (those of it that are loaded)."""
    components, kohya = {}, {}
    if models.unet is not None:
        components["unet"] = _unet_layers(models.unet, models.unet_params, models.unet_config)
        for module in components["unet"]:
            for name in (module, _sgm_name(module, models.unet)):
                if name is not None:
                    kohya["lora_unet_" + name.replace(".", "_")] = ("unet", module)
    for component, params in zip(TEXT_ENCODERS, models.text_encoder_params or ()):
        components[component] = _text_layers(component, params)
        prefixes = ("lora_te2_",) if component == "text_encoder_2" else ("lora_te_", "lora_te1_")
        for module in components[component]:
            for prefix in prefixes:
                for name in (module, _TEXT_MODEL + module):
                    kohya[prefix + name.replace(".", "_")] = (component, module)
    return Layout(components, kohya)


def lora_file(path) -> str:
    """``path`` itself, or the diffusers LoRA file in the folder ``path``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        candidate = os.path.join(path, WEIGHT_NAME)
        if not os.path.isfile(candidate):
            found = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
            raise FileNotFoundError(f"{path} holds no {WEIGHT_NAME}; pass the LoRA file itself"
                                    + (f" (there: {listed(found)})" if found else ""))
        return candidate
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: only .safetensors LoRA files are read (pickled .bin/.pt/.ckpt "
                         "files can run arbitrary code and are never loaded)")
    return path


def read_lora(path) -> tuple[dict, Optional[dict]]:
    """``(tensors, adapter metadata or None)`` of a LoRA ``.safetensors`` file (or folder)."""
    from safetensors import safe_open  # optional at import time, as in weights.py

    path = lora_file(path)
    try:
        handle = safe_open(path, framework="numpy")
    except Exception as err:  # the library raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from err
    bfloat16 = [n for n in handle.keys() if handle.get_slice(n).get_dtype() == "BF16"]
    tensors = {name: read_bfloat16(path, name).astype(np.float32) if name in bfloat16
               else handle.get_tensor(name) for name in handle.keys()}
    raw = (handle.metadata() or {}).get(METADATA_KEY)
    try:
        metadata = json.loads(raw) if raw else None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the {METADATA_KEY} metadata is not JSON ({err})") from err
    return tensors, metadata


def _parse_key(key: str, table: Layout):
    """``(component, module, factor)`` of a file key, or a string saying why it is not used."""
    if key.startswith(tuple(_KOHYA)):
        name, _, suffix = key.partition(".")
        if suffix not in _KOHYA_SUFFIX:
            return f"{key} (unknown kind {suffix!r}; expected {sorted(_KOHYA_SUFFIX)})"
        if name not in table.kohya:
            return f"{key} (no layer {name} in this model)"
        return table.kohya[name] + (_KOHYA_SUFFIX[suffix],)
    component, _, rest = key.partition(".")
    if component not in ("unet",) + TEXT_ENCODERS:
        component, rest = "unet", key  # a UNet-only file without the "unet." prefix
    processor = _PROCESSOR.match(rest)
    if processor:
        names = _PROCESSOR_MODULES["unet" if component == "unet" else "text"]
        module, factor = f"{processor[1]}.{names[processor[2]]}", processor[3]
        factor = "A" if factor == "down" else "B"
    else:
        suffix = next((s for s in _SUFFIXES if rest.endswith(s)), None)
        if suffix is None:
            return f"{key} (not a LoRA factor or alpha this loader knows)"
        module, factor = rest[:-len(suffix)], _SUFFIXES[suffix]
    if component != "unet":
        module = module[len(_TEXT_MODEL):] if module.startswith(_TEXT_MODEL) else module
    if module not in table.components.get(component, {}):
        has = component in table.components
        return (f"{key} (no layer {module} in this model's {component})" if has else
                f"{key} (this model has no {component} loaded)")
    return component, module, factor


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching a suffix of the name."""
    for name in (module, _TEXT_MODEL + module):
        for pattern, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", name):
                return value
    return default


def _component_metadata(metadata: Optional[dict], component: str) -> Optional[dict]:
    if not metadata:
        return None
    found = {k[len(component) + 1:]: v for k, v in metadata.items()
             if k.startswith(component + ".")}
    if component == "unet" and not found:
        found = {k: v for k, v in metadata.items() if "." not in k}
    return found or None


def _alpha(entry: dict, rank: int, meta: Optional[dict], component: str, module: str, kohya):
    """The effective alpha (scale = alpha / rank) of one module, or a problem string."""
    if "alpha" in entry:
        alpha = float(np.asarray(entry["alpha"]).reshape(-1)[0])
        return float(rank) if (kohya and alpha == 0) else alpha
    if meta is None:
        return float(rank)
    if meta.get("use_dora") or meta.get("lora_bias"):
        return f"{component} metadata: DoRA / LoRA biases are not supported"
    expected = _pattern_value(meta.get("rank_pattern"), module, meta.get("r", rank))
    if int(expected) != rank:
        return (f"{component}.{module}: the metadata gives rank {expected}, the tensors "
                f"rank {rank}")
    alpha = float(_pattern_value(meta.get("alpha_pattern"), module,
                                 meta.get("lora_alpha", rank)))
    return alpha * math.sqrt(rank) if meta.get("use_rslora") else alpha


def _factors(layer: Layer, key: str, entry: dict):
    """Flax ``(down, up)`` of one module from torch lora_A / lora_B, or a problem string."""
    a, b = np.asarray(entry["A"], np.float32), np.asarray(entry["B"], np.float32)
    rank = a.shape[0] if a.ndim else 0
    kernel = layer.shape
    expected_a, expected_b = layer.torch_shapes(rank)
    fits_a = {expected_a, (rank, kernel[-2]), (rank, kernel[-2], 1, 1)} if len(kernel) == 2 \
        else {expected_a}
    if len(kernel) == 4 and kernel[:2] == (1, 1):
        fits_a.add((rank, kernel[-2]))
    if a.shape not in fits_a or b.shape not in ((layer.width, rank), (layer.width, rank, 1, 1)):
        return (f"{key}: lora_A {a.shape} and lora_B {b.shape} do not fit {layer.component} "
                f"layer {layer.module} (our {layer.path}, kernel {kernel}); expected lora_A "
                f"{expected_a} and lora_B {expected_b} for rank {rank}")
    if len(kernel) == 4:
        down = a.reshape((rank, kernel[2]) + tuple(kernel[:2])).transpose(2, 3, 1, 0)
    else:
        down = a.reshape(rank, kernel[0]).T
    return down, b.reshape(layer.width, rank).T


def _assemble(layers: list, parts: dict, dtype):
    """One kernel's ``(factors, alpha)`` from its modules' ``(down, up, alpha)``."""
    if len(layers) == 1 and layers[0].width == layers[0].shape[-1]:
        down, up, alpha = parts[layers[0].module]
        return {"down": jnp.asarray(down, dtype), "up": jnp.asarray(up, dtype)}, alpha
    present = [layer for layer in layers if layer.module in parts]
    ranks = [parts[l.module][0].shape[-1] for l in present]
    scale = parts[present[0].module][2] / ranks[0]
    total = sum(ranks)
    up = np.zeros((total, layers[0].shape[-1]), np.float32)
    row = 0
    for layer, rank in zip(present, ranks):
        _, part_up, alpha = parts[layer.module]
        ratio = (alpha / rank) / scale
        up[row:row + rank, layer.start:layer.start + layer.width] = (
            part_up if ratio == 1.0 else part_up * ratio)
        row += rank
    down = np.concatenate([parts[l.module][0] for l in present], axis=-1)
    return {"down": jnp.asarray(down, dtype), "up": jnp.asarray(up, dtype)}, scale * total


def convert_lora(tensors: dict, table: Layout, metadata: Optional[dict] = None, *,
                 where: str = "the LoRA", num_text_encoders: Optional[int] = None,
                 dtype=jnp.float32) -> StableDiffusionLora:
    """The adapters a LoRA state dict (name -> array) makes on the models of ``table``.

    ``metadata`` is the file's ``lora_adapter_metadata`` (None: alpha = rank unless the file
    holds alpha tensors). Raises one ValueError listing every key that is not used and every
    tensor that does not fit, naming ``where``."""
    entries = collections.defaultdict(dict)
    unused, unfit = [], []
    for key, value in tensors.items():
        parsed = _parse_key(key, table)
        if isinstance(parsed, str):
            unused.append(parsed)
            continue
        component, module, factor = parsed
        entry = entries[(component, module)]
        if factor in entry:
            unfit.append(f"{key} ({component} layer {module} has its {factor} twice: "
                            f"{entry['keys']})")
        entry[factor] = value
        entry.setdefault("keys", []).append(key)
        entry["kohya"] = key.startswith(tuple(_KOHYA))
    parts = collections.defaultdict(dict)
    for (component, module), entry in sorted(entries.items()):
        if "A" not in entry or "B" not in entry:
            unfit.append(f"{', '.join(entry['keys'])} (layer {module} of {component} needs "
                            "both its down (lora_A) and up (lora_B) factors)")
            continue
        layer = table.components[component][module]
        factors = _factors(layer, entry["keys"][0], entry)
        alpha = None if isinstance(factors, str) else _alpha(
            entry, factors[0].shape[-1], _component_metadata(metadata, component), component,
            module, entry["kohya"])
        for problem in (factors, alpha):
            if isinstance(problem, str):
                unfit.append(problem)
        if not isinstance(factors, str) and not isinstance(alpha, str):
            parts[component][module] = (factors[0], factors[1], alpha)
    if unfit or unused:
        raise ValueError(f"{where} does not fit this model (is it a LoRA of another base "
                         "model?)\n" + "\n".join(
                             f"{kind} ({len(items)}):\n" + "\n".join(items[:_MAX_PROBLEMS]) + (
                                 f"\n... ({len(items) - _MAX_PROBLEMS} more)"
                                 if len(items) > _MAX_PROBLEMS else "")
                             for kind, items in (("layers whose tensors do not fit", unfit),
                                                 ("keys it cannot use", unused)) if items))
    adapters = {}
    for component, modules in parts.items():
        weights, alphas = {}, {}
        for path, layers in table.by_path(component).items():
            if any(layer.module in modules for layer in layers):
                weights[path], alphas[path] = _assemble(layers, modules, dtype)
        adapters[component] = lora.Adapter(weights, alphas)
    count = num_text_encoders if num_text_encoders is not None else sum(
        name in table.components for name in TEXT_ENCODERS)
    return StableDiffusionLora(adapters.get("unet"),
                               [adapters.get(name) for name in TEXT_ENCODERS[:count]])


def load_lora(path, models, *, dtype=jnp.float32) -> StableDiffusionLora:
    """Reads the LoRA file ``path`` (or the ``pytorch_lora_weights.safetensors`` of a folder).

    ``models`` is the :class:`StableDiffusionModels` it is for (only its UNet and text encoders'
    parameter shapes and configs are read); the factors come back as ``dtype`` (float32)."""
    tensors, metadata = read_lora(path)
    return convert_lora(tensors, layout(models), metadata, where=lora_file(path),
                        num_text_encoders=len(models.text_encoder_params or ()), dtype=dtype)


def merged_params(unet_params, text_encoder_params, loras, scales):
    """``(unet, text encoders)`` parameters with ``loras`` merged in, ``scales[i]`` for LoRA i.

    ``scales`` may be a list of floats or a traced vector (inside a compiled program); a LoRA
    without an adapter for a network leaves it out, and a network no LoRA adapts is returned as
    it is."""
    def merged(params, adapters):
        chosen = [(a, i) for i, a in enumerate(adapters) if a is not None]
        if not chosen or params is None:
            return params
        return lora.apply(params, [a for a, _ in chosen], [scales[i] for _, i in chosen])

    encoders = [merged(params, [l.text_encoders[i] if i < len(l.text_encoders) else None
                                for l in loras])
                for i, params in enumerate(text_encoder_params or ())]
    return merged(unet_params, [l.unet for l in loras]), encoders


def merge_into(models, loras, scales=1.0):
    """A copy of ``models`` with LoRAs merged into its UNet and text-encoder parameters.

    ``loras`` is a :class:`StableDiffusionLora` or a sequence, ``scales`` one strength or one
    per LoRA (diffusers' ``set_adapters(..., adapter_weights=...)``)."""
    loras = [loras] if isinstance(loras, StableDiffusionLora) else list(loras)
    scales = list(scales) if isinstance(scales, (list, tuple)) else [scales] * len(loras)
    unet, encoders = merged_params(models.unet_params, models.text_encoder_params, loras,
                                   scales)
    return dataclasses.replace(models, unet_params=unet, text_encoder_params=encoders)


def _split(layers: list, factors: dict, alpha: float) -> list:
    """``(layer, down, up, alpha)`` per module of one kernel, exactly (see the module doc)."""
    down, up = np.asarray(factors["down"], np.float32), np.asarray(factors["up"], np.float32)
    if len(layers) == 1:
        return [(layers[0], down, up, alpha)]
    rank = up.shape[0]
    columns = [up[:, l.start:l.start + l.width] for l in layers]
    support = [np.flatnonzero(np.any(c != 0, axis=1)) for c in columns]
    used = np.concatenate(support)
    if len(used) and len(np.unique(used)) == len(used):  # disjoint row blocks
        return [(l, down[..., rows], c[rows], alpha / rank * len(rows))
                for l, c, rows in zip(layers, columns, support) if len(rows)]
    return [(l, down, c, alpha) for l, c in zip(layers, columns)]


def _torch_factors(layer: Layer, down, up):
    if len(layer.shape) == 4:
        return down.transpose(3, 2, 0, 1), up.T[:, :, None, None]
    if layer.conv is not None:
        return down.T[:, :, None, None], up.T[:, :, None, None]
    return down.T, up.T


def _number(value: float):
    return int(value) if float(value).is_integer() else float(value)


def _peft_state(component: str, adapter: lora.Adapter, table: Layout):
    """The PEFT tensors and ``lora_adapter_metadata`` entries of one component's adapter."""
    by_path = table.by_path(component)
    tensors, ranks, alphas = {}, {}, {}
    for path in adapter.paths:
        if path not in by_path:
            raise ValueError(f"{component} adapter layer {path} has no diffusers name (is the "
                             "adapter for this model?)")
        for layer, down, up, alpha in _split(by_path[path], adapter.weights[path],
                                             adapter.alphas[path]):
            a, b = _torch_factors(layer, down, up)
            name = layer.module if component == "unet" or layer.module.startswith(
                "text_projection") else _TEXT_MODEL + layer.module
            tensors[f"{component}.{name}.lora_A.weight"] = np.ascontiguousarray(a)
            tensors[f"{component}.{name}.lora_B.weight"] = np.ascontiguousarray(b)
            ranks[layer.module], alphas[layer.module] = up.shape[0], alpha
    rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    # PEFT matches a pattern against the end of each module name ("(.*\.)?(pattern)$"); full
    # names pick one module, with or without a text encoder's "text_model." prefix.
    meta = {"r": rank, "lora_alpha": _number(alpha), "target_modules": sorted(ranks),
            "rank_pattern": {re.escape(m): r for m, r in ranks.items() if r != rank},
            "alpha_pattern": {re.escape(m): _number(a) for m, a in alphas.items() if a != alpha},
            "use_rslora": False, "use_dora": False, "lora_bias": False, "bias": "none"}
    return tensors, {f"{component}.{k}": v for k, v in meta.items()}


def save_lora(path, loras: StableDiffusionLora, models) -> str:
    """Writes ``loras`` in diffusers' PEFT layout, readable by its ``load_lora_weights``.

    ``path`` is the file, or a folder to write ``pytorch_lora_weights.safetensors`` into. Rank
    and alpha of every module go into the ``lora_adapter_metadata`` metadata (so diffusers
    scales each by alpha / rank). The file is written to a temporary name and renamed into
    place. Returns the file's path."""
    from safetensors.numpy import save_file  # optional at import time

    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHT_NAME)
    table = layout(models)
    tensors, metadata = {}, {}
    for component, adapter in loras.components().items():
        if component not in table.components:
            raise ValueError(f"the LoRA has a {component} adapter but the models have no "
                             f"{component} loaded")
        lora.check(models.unet_params if component == "unet" else
                   models.text_encoder_params[TEXT_ENCODERS.index(component)], adapter)
        part, meta = _peft_state(component, adapter, table)
        tensors.update(part)
        metadata.update(meta)
    if not tensors:
        raise ValueError("the LoRA holds no adapter to save")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".lora-", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata={
            "format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)})
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return path

