"""Low-rank adaptation (LoRA, Hu et al. 2021) of parameter trees, as pure functions.

An :class:`Adapter` holds, for some kernels of a base model's parameter tree, two low-rank
factors keyed by the kernel's "/"-joined path (``"down_0_attn_0/block_0/self_attention/qkv/
kernel"``): a Dense kernel W [in, out] gets ``down`` [in, r] and ``up`` [r, out], a convolution
kernel W [kh, kw, in, out] gets ``down`` [kh, kw, in, r] and ``up`` [r, out], and the adapted
kernel is

    W + scale * (alpha / r) * delta,   delta[..., i, o] = sum_k down[..., i, k] up[k, o],

with ``alpha`` per layer (files trained by kohya's scripts carry one per layer) and ``scale`` the
strength chosen at use time (diffusers' adapter weight / ``lora_scale``). The factors are the
adapter's only pytree leaves; the alphas are static (pytree aux data), so an Adapter can be the
differentiated argument of a loss, an optimizer state's template or a checkpoint item as is.

:func:`init` makes a fresh adapter for the kernels a target selection picks (:data:`PRESETS`
or regular expressions; :func:`select` lists them), with ``down`` initialised as PEFT does
(Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))) and ``up`` zero,
so that a fresh adapter leaves the model exactly as it was. :func:`apply` (also :func:`merge`)
returns the base tree with one or several adapters merged in, each with its own scale;
:func:`unmerge` subtracts them again. Both are pure and jit-friendly: the base tree is never
modified, and the kernels no adapter touches are returned as they are.

Training only the adapter (the base frozen)::

    adapter = lora.init(params, "unet_attention", rank=8, alpha=8, key=key)

    def loss_fn(adapter, params, batch):
        adapted = lora.apply(params, adapter)        # inside jit; gradients reach the factors
        return loss(model.apply({"params": adapted}, ...))

    grads = jax.grad(loss_fn)(adapter, params, batch)   # an Adapter of gradients
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

import flax.core
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Adapter", "AdapterSize", "PRESETS", "select", "init", "apply", "merge", "unmerge",
           "check", "delta", "size", "kernel_paths"]

FACTORS = ("down", "up")

# Blocks of our UNet that hold attention: SpatialTransformer (text-conditioned, Stable
# Diffusion's) or AttentionBlock (unconditional / class-conditioned).
_UNET_BLOCK = r"(down_\d+_attn_\d+|mid_attn|up_\d+_attn_\d+)"
_UNET_SELF = r"self_attention/(qkv|out)"
_CROSS = r"cross_attention/(query|key_value|out)"
_UNET_ATTENTION = (rf"^{_UNET_BLOCK}/(block_\d+/({_UNET_SELF}|{_CROSS})"
                   r"|attention/(qkv|out))/kernel$")
_UNET_TRANSFORMER = (rf"^{_UNET_BLOCK}/(proj_in|proj_out|attention/(qkv|out)|block_\d+/"
                     rf"({_UNET_SELF}|{_CROSS}|feed_forward/(proj_in|proj_out)))/kernel$")
_DIT_ATTENTION = rf"^block_\d+/(attention/(qkv|out)|{_CROSS})/kernel$"
_DIT_BLOCKS = rf"^block_\d+/(attention/(qkv|out)|{_CROSS}|mlp_0|mlp_1)/kernel$"
_CLIP_ATTENTION = r"^encoder/layers_\d+/self_attn/(q_proj|k_proj|v_proj|out_proj)/kernel$"
_CLIP_TRANSFORMER = (r"^encoder/layers_\d+/(self_attn/(q_proj|k_proj|v_proj|out_proj)"
                     r"|mlp/(fc1|fc2))/kernel$")


def _regex(pattern: str) -> Callable[[str, tuple], bool]:
    compiled = re.compile(pattern)
    return lambda path, shape: compiled.search(path) is not None


# Preset name -> predicate on (path, kernel shape). Every preset selects kernels only.
PRESETS: dict[str, Callable[[str, tuple], bool]] = {
    # The q/k/v and output projections of every attention layer of our UNet (Stable Diffusion's
    # to_q, to_k, to_v, to_out.0: the default targets of diffusers' LoRA training scripts).
    "unet_attention": _regex(_UNET_ATTENTION),
    # unet_attention plus the feed-forward layers and proj_in / proj_out of the transformers
    # (kohya's default for Stable Diffusion UNets).
    "unet_transformer": _regex(_UNET_TRANSFORMER),
    # The DiT's self- and cross-attention projections; dit_blocks adds the MLPs.
    "dit_attention": _regex(_DIT_ATTENTION),
    "dit_blocks": _regex(_DIT_BLOCKS),
    # The CLIP text encoder's q_proj, k_proj, v_proj, out_proj; clip_transformer adds fc1, fc2.
    "clip_attention": _regex(_CLIP_ATTENTION),
    "clip_transformer": _regex(_CLIP_TRANSFORMER),
    # Whichever of the three attention presets fits the tree.
    "attention": lambda path, shape: any(PRESETS[name](path, shape) for name in (
        "unet_attention", "dit_attention", "clip_attention")),
    "all_linear": lambda path, shape: len(shape) == 2,
    "all_conv": lambda path, shape: len(shape) == 4,
    "all": lambda path, shape: True,
}

Targets = Union[str, Sequence[str]]


def _path_string(path: tuple) -> str:
    return "/".join(str(part) for part in path)


def _flat(params) -> dict:
    """``{"a/b/kernel": leaf}`` of a nested parameter dict (or FrozenDict)."""
    return {_path_string(p): v for p, v in flax.traverse_util.flatten_dict(
        flax.core.unfreeze(params) if isinstance(params, flax.core.FrozenDict) else params
    ).items()}


def kernel_paths(params) -> dict[str, tuple]:
    """Every kernel LoRA can adapt (leaf ``kernel`` of 2 or 4 dims): "/"-joined path -> shape."""
    return {path: tuple(np.shape(leaf)) for path, leaf in _flat(params).items()
            if path.rpartition("/")[2] == "kernel" and np.ndim(leaf) in (2, 4)}


def select(params, targets: Targets) -> list[str]:
    """The kernel paths of ``params`` that ``targets`` selects, sorted.

    ``targets`` is a preset name (see :data:`PRESETS`), a regular expression searched for in each
    kernel's "/"-joined path (``re.search``: anchor it with ``^`` and ``$`` for exact matches), or
    a sequence of them (their union). Selecting nothing is a ValueError naming some kernels."""
    items = [targets] if isinstance(targets, str) else list(targets)
    if not items:
        raise ValueError("no LoRA targets given")
    predicates = []
    for item in items:
        if item in PRESETS:
            predicates.append(PRESETS[item])
        else:
            try:
                predicates.append(_regex(item))
            except re.error as err:
                raise ValueError(f"LoRA target {item!r} is neither a preset ({sorted(PRESETS)}) "
                                 f"nor a regular expression: {err}") from err
    kernels = kernel_paths(params)
    chosen = sorted(p for p, shape in kernels.items() if any(f(p, shape) for f in predicates))
    if not chosen:
        examples = ", ".join(sorted(kernels)[:8])
        raise ValueError(f"LoRA targets {items} select no kernel of this parameter tree "
                         f"({len(kernels)} kernels, e.g. {examples}); presets: {sorted(PRESETS)}")
    return chosen


@jax.tree_util.register_pytree_with_keys_class
class Adapter:
    """Low-rank factors for some kernels of a base parameter tree, with a static alpha per layer.

    ``weights`` maps a kernel's "/"-joined path to ``{"down": [..., in, r], "up": [r, out]}``
    (the pytree leaves); ``alphas`` maps the same paths to alpha (static aux data: changing an
    alpha retraces a jitted function, changing a factor does not). The scale of a layer at
    strength 1 is alpha / r. Build one with :func:`init` or from a file
    (:mod:`diffusion_jax.pretrained.lora_files`)."""

    def __init__(self, weights: Mapping[str, Mapping[str, Any]], alphas: Mapping[str, float]):
        weights = {str(path): dict(factors) for path, factors in weights.items()}
        alphas = {str(path): float(alpha) for path, alpha in alphas.items()}
        if set(weights) != set(alphas):
            raise ValueError(f"adapter weights and alphas name different layers: "
                             f"{sorted(set(weights) ^ set(alphas))}")
        for path, factors in weights.items():
            if set(factors) != set(FACTORS):
                raise ValueError(f"adapter layer {path} holds {sorted(factors)}, not "
                                 f"{list(FACTORS)}")
        self.weights = weights
        self.alphas = alphas

    def tree_flatten_with_keys(self):
        """The factors are the leaves; the alphas, sorted by path, are the aux data."""
        return (((jax.tree_util.GetAttrKey("weights"), self.weights),),
                tuple(sorted(self.alphas.items())))

    @classmethod
    def tree_unflatten(cls, aux, children):
        """Rebuilds an Adapter from :meth:`tree_flatten_with_keys`' parts."""
        adapter = object.__new__(cls)
        adapter.weights, adapter.alphas = children[0], dict(aux)
        return adapter

    @property
    def paths(self) -> list[str]:
        """The adapted kernels' paths, sorted."""
        return sorted(self.weights)

    @property
    def ranks(self) -> dict[str, int]:
        """Path -> rank r (rows of ``up``)."""
        return {path: int(np.shape(f["up"])[0]) for path, f in self.weights.items()}

    @property
    def scales(self) -> dict[str, float]:
        """Path -> alpha / r, the factor the delta is multiplied by at strength 1."""
        ranks = self.ranks
        return {path: self.alphas[path] / ranks[path] for path in self.weights}

    def astype(self, dtype) -> "Adapter":
        """The same adapter with its factors cast to ``dtype``."""
        return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), self)

    def __repr__(self):
        try:
            counted = size(self)
            ranks = sorted(set(self.ranks.values()))
            return (f"Adapter({counted.layers} layers, rank {'/'.join(map(str, ranks))}, "
                    f"{counted.parameters:,} parameters)")
        except (TypeError, AttributeError, IndexError):  # placeholder leaves in tree utilities
            return f"Adapter({len(self.weights)} layers)"


class AdapterSize(NamedTuple):
    """How big an adapter is: adapted layers, parameters (factor entries) and bytes."""

    layers: int
    parameters: int
    bytes: int


def size(adapter: Adapter) -> AdapterSize:
    """Layers, parameters and bytes of ``adapter``'s factors."""
    leaves = jax.tree_util.tree_leaves(adapter)
    return AdapterSize(len(adapter.weights), int(sum(np.size(x) for x in leaves)),
                       int(sum(np.size(x) * jnp.dtype(x.dtype).itemsize for x in leaves)))


def init(params, targets: Targets, rank: int, alpha: Optional[float], key, *,
         dtype=jnp.float32) -> Adapter:
    """A fresh adapter of ``rank`` for the kernels of ``params`` that ``targets`` selects.

    ``alpha`` is every layer's alpha (None: ``rank``, i.e. scale 1). ``down`` is drawn from
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = in * kh * kw (PEFT's Kaiming-uniform with
    a = sqrt(5)), all from one draw of ``key``; ``up`` is zero, so :func:`apply` returns the
    base unchanged. ``params`` may hold arrays or ``jax.ShapeDtypeStruct`` s (only shapes are
    read). The factors are ``dtype`` (float32), whatever the base's dtype."""
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if key is None:
        raise ValueError("lora.init needs a PRNG key for the down factors")
    alpha = float(rank if alpha is None else alpha)
    kernels = kernel_paths(params)
    paths = select(params, targets)
    downs = _draw_downs(key, tuple(kernels[p] for p in paths), int(rank), jnp.dtype(dtype))
    weights = {path: {"down": down, "up": jnp.asarray(np.zeros((int(rank), kernels[path][-1]),
                                                                 dtype))}
               for path, down in zip(paths, downs)}
    return Adapter(weights, {path: alpha for path in paths})


def _draw_downs(key, shapes: tuple, rank: int, dtype) -> list:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) down factors, cut from one draw of U(-1, 1).

    Cut on the host when ``key`` is concrete (one small compilation whatever the layer count),
    in the trace under ``jit``: the same numbers either way."""
    sizes = [math.prod(shape[:-1]) * rank for shape in shapes]
    flat = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
    try:
        flat, traced = np.asarray(flat), False
    except jax.errors.TracerArrayConversionError:  # under jit / eval_shape
        traced = True
    downs, offset = [], 0
    for shape, count in zip(shapes, sizes):
        piece = flat[offset:offset + count] * np.float32(1.0 / math.sqrt(math.prod(shape[:-1])))
        piece = piece.reshape(shape[:-1] + (rank,))
        downs.append(piece.astype(dtype) if traced else jnp.asarray(np.asarray(piece, dtype)))
        offset += count
    return downs


def _adapters_and_scales(adapters, scales) -> list[tuple[Adapter, Any]]:
    adapters = [adapters] if isinstance(adapters, Adapter) else list(adapters)
    for adapter in adapters:
        if not isinstance(adapter, Adapter):
            raise TypeError(f"expected lora.Adapter objects, got {type(adapter).__name__}")
    if isinstance(scales, (list, tuple)) or np.ndim(scales) == 1:
        if len(scales) != len(adapters):
            raise ValueError(f"{len(scales)} scales for {len(adapters)} adapters")
        return list(zip(adapters, scales))
    return [(adapter, scales) for adapter in adapters]


def check(params, adapter: Adapter) -> None:
    """Raises a ValueError if ``adapter`` does not fit ``params`` (made for another model).

    Names the layer path and both shapes: each adapted path must be a kernel of ``params``, and
    its ``down`` [..., in, r] and ``up`` [r, out] must fit the kernel's [..., in, out]."""
    kernels = kernel_paths(params)
    problems = []
    for path in adapter.paths:
        down, up = (tuple(np.shape(adapter.weights[path][f])) for f in FACTORS)
        if path not in kernels:
            problems.append(f"{path}: no such kernel in the base parameters (down {down}, "
                            f"up {up})")
            continue
        shape = kernels[path]
        rank = up[0] if len(up) == 2 else None
        if rank is None or down != shape[:-1] + (rank,) or up != (rank, shape[-1]):
            expected = f"down {shape[:-1] + ('r',)} and up ('r', {shape[-1]})"
            problems.append(f"{path}: adapter down {down} and up {up} do not fit the base "
                            f"kernel {shape} (expected {expected})")
    if problems:
        raise ValueError(f"the LoRA adapter does not fit these parameters ({len(problems)} "
                         "layers; was it made for another model?):\n" + "\n".join(problems))


def delta(adapter: Adapter, path: str):
    """``(alpha / r) * down @ up`` of one layer, in the kernel's layout (float32 or wider)."""
    factors = adapter.weights[path]
    down, up = jnp.asarray(factors["down"]), jnp.asarray(factors["up"])
    dtype = jnp.promote_types(jnp.promote_types(down.dtype, up.dtype), jnp.float32)
    product = jnp.tensordot(down.astype(dtype), up.astype(dtype), axes=1,
                            precision=jax.lax.Precision.HIGHEST)
    return product * (adapter.alphas[path] / up.shape[0])


@jax.jit
def _merged_kernels(kernels: dict, adapters: tuple, scales: tuple) -> dict:
    """Each kernel plus its adapters' scaled deltas (one compiled program for all layers)."""
    merged = {}
    for path, base in kernels.items():
        terms = [delta(a, path) * jnp.asarray(s, jnp.float32)
                 for a, s in zip(adapters, scales) if path in a.weights]
        total = functools.reduce(jnp.add, terms)
        wide = jnp.promote_types(base.dtype, total.dtype)
        merged[path] = (base.astype(wide) + total.astype(wide)).astype(base.dtype)
    return merged


def _add(params, adapters, scales, sign):
    pairs = _adapters_and_scales(adapters, scales)
    for adapter, _ in pairs:
        check(params, adapter)
    frozen = isinstance(params, flax.core.FrozenDict)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params) if frozen else params)
    by_string = {_path_string(p): p for p in flat}
    paths = sorted({path for adapter, _ in pairs for path in adapter.weights})
    merged = _merged_kernels({p: jnp.asarray(flat[by_string[p]]) for p in paths},
                             tuple(a for a, _ in pairs),
                             tuple(-s if sign < 0 else s for _, s in pairs))
    out = dict(flat)
    out.update({by_string[path]: kernel for path, kernel in merged.items()})
    tree = flax.traverse_util.unflatten_dict(out)
    return flax.core.freeze(tree) if frozen else tree


def apply(params, adapters: Union[Adapter, Iterable[Adapter]], scales=1.0):
    """``params`` with each adapted kernel W replaced by W + sum_i scale_i (alpha/r) delta_i.

    ``adapters`` is one :class:`Adapter` or a sequence; ``scales`` one strength for all (a float
    or a traced scalar) or one per adapter (a list, or a vector). Every adapter is first checked
    against ``params`` (:func:`check`). The sum is formed in float32 (or the base's dtype, if
    wider) and cast back to each kernel's dtype; the other leaves are returned as they are and
    ``params`` itself is not modified. Usable under ``jit`` / ``grad`` with the adapters as
    traced arguments; a fresh adapter (``up`` = 0) returns every kernel bit for bit."""
    return _add(params, adapters, scales, 1.0)


merge = apply


def unmerge(params, adapters: Union[Adapter, Iterable[Adapter]], scales=1.0):
    """Subtracts what :func:`apply` added: the base again, up to float round-off."""
    return _add(params, adapters, scales, -1.0)
