"""The optimizer: AdamW with a linear learning-rate warmup and global-norm gradient clipping."""

from __future__ import annotations

from typing import Optional

import jax
import optax

from diffusion_jax import parallel

__all__ = ["learning_rate_schedule", "clip_by_global_norm", "make_optimizer",
           "optimizer_from_config"]


def learning_rate_schedule(learning_rate: float, warmup_steps: int = 0):
    """A linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then constant."""
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not warmup_steps:
        return optax.constant_schedule(learning_rate)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup_steps),
         optax.constant_schedule(learning_rate)],
        [warmup_steps],
    )


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """``optax.clip_by_global_norm`` that can take a norm the caller has already computed.

    Same rule and same empty state as optax's, so checkpoints are the same. The norm comes as
    ``update(..., grad_norm=...)``: the train step computes it once, for the metric too, with
    :func:`parallel.global_norm` in the way that suits the mesh. Without it, the norm is
    computed here, leaf by leaf. A given norm must be that of the updates this transformation
    receives, so it goes first in a chain (as in :func:`make_optimizer`).
    """

    def update(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        norm = parallel.global_norm(updates) if grad_norm is None else grad_norm
        keep = norm < max_norm
        return jax.tree_util.tree_map(
            lambda g: jax.lax.select(keep, g, (g / norm.astype(g.dtype)) * max_norm),
            updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def make_optimizer(
    learning_rate: float,
    *,
    warmup_steps: int = 0,
    grad_clip: Optional[float] = 1.0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """AdamW with a linear warmup to ``learning_rate`` and global-norm gradient clipping."""
    schedule = learning_rate_schedule(learning_rate, warmup_steps)
    lr = schedule if warmup_steps else learning_rate  # a constant needs no step counter
    parts = []
    if grad_clip:
        parts.append(clip_by_global_norm(grad_clip))
    parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)


def optimizer_from_config(config) -> optax.GradientTransformation:
    """:func:`make_optimizer` with ``config.training``'s settings."""
    t = config.training
    return make_optimizer(t.learning_rate, warmup_steps=t.warmup_steps,
                          grad_clip=t.grad_clip or None, weight_decay=t.weight_decay)
