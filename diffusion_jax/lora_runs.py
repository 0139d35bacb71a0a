"""Runs that train LoRA adapters of a frozen model (``config.lora.rank`` > 0).

The base model comes from a run's workdir (``config.lora.base``: its checkpoint, EMA
parameters) or from a Stable Diffusion folder (``config.pretrained.path``). The train state's
``params`` are the adapters (:mod:`diffusion_jax.lora`) and its ``frozen`` the base, held once
(no EMA, no optimizer moments) in the shardings the mesh gives parameters (replicated, or split
over ``fsdp``); the network runs with ``lora.apply(base, adapters)``
(:func:`diffusion_jax.train_state.model_params`). Checkpoints hold the adapters, their EMA and
their optimizer state; the base is read again on resuming, from the same checkpoint step of the
base run (``WORKDIR/lora.json`` records it), so a resumed run continues bit for bit.

The adapters sit on the denoiser's kernels that ``config.lora.targets`` selects (a preset of
:data:`diffusion_jax.lora.PRESETS` or regular expressions, on the denoiser's own parameter
paths) and, with ``config.lora.text_encoder``, on the text encoder's attention (CLIP) or
linear layers (the byte-level encoder).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import flax.traverse_util
import jax
import jax.numpy as jnp

from diffusion_jax import configuration, lora, train_state

__all__ = ["enabled", "adapter_paths", "adapted_paths", "abstract_state", "make_state", "fingerprint",
           "adapter_of", "LORA_FILE", "OFF_FINGERPRINT", "Compose"]

LORA_FILE = "lora.json"  # in the run's workdir: which base (folder or run, and its step)


def enabled(config) -> bool:
    """Whether ``config`` trains adapters of a frozen model."""
    return config.lora.rank > 0


def _targets(config) -> list:
    return [t.strip() for t in config.lora.targets.split(",") if t.strip()]


def adapter_paths(config, params) -> list[str]:
    """The kernels the run's adapters sit on ("/"-joined paths of the model's parameters).

    A model with a text encoder (``{"denoiser": ..., "encoder": ...}``) gets ``lora.targets``
    on its denoiser and, with ``lora.text_encoder``, the encoder's attention (CLIP) or linear
    layers (the byte-level encoder, whose attention kernels are 3-D)."""
    wrapped = isinstance(params, dict) and set(params) == {"denoiser", "encoder"}
    try:
        if not wrapped:
            return lora.select(params, _targets(config))
        paths = ["denoiser/" + p for p in lora.select(params["denoiser"], _targets(config))]
        if config.lora.text_encoder:
            clip = any(p.startswith("encoder/layers_") for p in lora.kernel_paths(
                params["encoder"]))
            paths += ["encoder/" + p for p in lora.select(
                params["encoder"], "clip_attention" if clip else "all_linear")]
        return paths
    except ValueError as err:
        raise configuration.ConfigError(f"config.lora.targets={config.lora.targets!r}: {err}") \
            from err


def _nested(weights: dict) -> dict:
    """``{"a/b/kernel": factors}`` as a nested tree (checkpoints need plain names)."""
    return flax.traverse_util.unflatten_dict({tuple(p.split("/")): f for p, f in weights.items()})


def _flat(nested: dict) -> dict:
    flat = flax.traverse_util.flatten_dict(nested)
    out = {}
    for path, leaf in flat.items():
        out.setdefault("/".join(path[:-1]), {})[path[-1]] = leaf
    return out


def adapted_paths(params) -> list[str]:
    """The kernel paths a train state's (nested) adapter ``params`` adapt, sorted."""
    return sorted(_flat(params))


def adapter_of(params, alphas: tuple) -> lora.Adapter:
    """The :class:`~diffusion_jax.lora.Adapter` a train state's (nested) ``params`` hold."""
    return lora.Adapter(_flat(params), dict(alphas))


@dataclasses.dataclass(frozen=True)
class Compose:
    """``compose(frozen, params)``: the base with the adapters merged in.

    A train state's static ``compose``; equal for equal alphas, so that jit caches and
    shardings match."""

    alphas: tuple  # ((path, alpha), ...) sorted

    def __call__(self, frozen, params):
        return lora.apply(frozen, adapter_of(params, self.alphas))


def make_state(config, optimizer, paths, base):
    """The first adapter state around ``base`` (jit-able: arrays in, arrays out)."""
    key_adapter, _, key_rng = jax.random.split(
        jax.random.fold_in(jax.random.key(config.seed), 0x10A), 3)
    alpha = config.lora.alpha or None
    adapter = lora.init(base, [f"^{re.escape(p)}$" for p in paths], config.lora.rank, alpha,
                        key_adapter)
    params = _nested(adapter.weights)
    alphas = tuple(sorted(adapter.alphas.items()))
    return train_state.TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        ema_params=jax.tree_util.tree_map(jnp.copy, params), opt_state=optimizer.init(params),
        rng=jax.random.key_data(key_rng), frozen=base,
        compose=Compose(alphas))


def abstract_state(config, model, optimizer, example_shape, num_classes):
    """The shapes of an adapter run's train state (base included), nothing allocated."""
    base = train_state.abstract_train_state(model, optimizer, example_shape, num_classes,
                                            config.seed).params
    paths = adapter_paths(config, base)
    return jax.eval_shape(functools.partial(make_state, config, optimizer, paths), base)


# What checkpoints of runs without adapters record (and those written before adapters).
OFF_FINGERPRINT = {"rank": 0}


def fingerprint(config) -> dict:
    """What a run's checkpoints record of its adapters (their shapes and scale; rank 0: none)."""
    if not enabled(config):
        return dict(OFF_FINGERPRINT)
    return {"rank": config.lora.rank, "alpha": config.lora.alpha or config.lora.rank,
            "targets": config.lora.targets, "text_encoder": bool(config.lora.text_encoder)}
