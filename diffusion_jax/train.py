"""Training: the train state, the optimizer, and one pure, jit-compiled training step.

``train_step(state, batch) -> (state, metrics)`` takes host-agnostic arrays and returns a new
state; it draws its randomness from ``fold_in(state.rng, state.step)``, so a run restored from a
checkpoint at step k continues exactly as the uninterrupted run would. The config-driven loop
(data, checkpoints, metrics, sample grids) builds on these pieces.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax

__all__ = [
    "TrainState",
    "make_optimizer",
    "network_apply_fn",
    "create_train_state",
    "make_train_step",
]


@flax.struct.dataclass
class TrainState:
    """Everything a training run needs to continue: step, parameters, their exponential moving
    average, optimizer state and the base PRNG key."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array


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
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    lr = learning_rate
    if warmup_steps:
        lr = optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, warmup_steps),
             optax.constant_schedule(learning_rate)],
            [warmup_steps],
        )
    parts = []
    if grad_clip:
        parts.append(optax.clip_by_global_norm(grad_clip))
    parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)


def network_apply_fn(model, *, num_classes: Optional[int] = None, label_dropout: float = 0.0,
                     label_key: str = "label"):
    """Adapt a Flax denoiser to the loss's ``apply_fn(params, x_in, noise_input, cond, key)``.

    In training, each label is replaced by the null label ``num_classes`` with probability
    ``label_dropout``, which teaches the same network the unconditional denoiser that
    classifier-free guidance needs (Ho & Salimans 2021).
    """
    if label_dropout and num_classes is None:
        raise ValueError("label_dropout needs num_classes (the null label's index)")

    def apply_fn(params, x_in, noise_input, cond, key):
        key_drop, key_labels = jax.random.split(key)
        labels = cond.get(label_key) if num_classes is not None else None
        if labels is not None and label_dropout:
            drop = jax.random.bernoulli(key_labels, label_dropout, labels.shape)
            labels = jnp.where(drop, num_classes, labels)
        return model.apply({"params": params}, x_in, noise_input, labels, train=True,
                           rngs={"dropout": key_drop})

    return apply_fn


def create_train_state(model, optimizer, example_x, key, *, with_labels: bool = False) -> TrainState:
    """Initialise parameters from an example input (only its shape and dtype matter)."""
    key_params, key_dropout, key_rng = jax.random.split(key, 3)
    batch = example_x.shape[0]
    args = [jnp.zeros(example_x.shape, jnp.float32), jnp.zeros((batch,), jnp.float32)]
    if with_labels:
        args.append(jnp.zeros((batch,), jnp.int32))
    variables = model.init({"params": key_params, "dropout": key_dropout}, *args)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree_util.tree_map(jnp.copy, params),
        opt_state=optimizer.init(params),
        rng=key_rng,
    )


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, *,
                    ema_decay: float = 0.9999):
    """Build the pure ``train_step(state, batch) -> (state, metrics)``.

    ``loss_fn(params, batch, key) -> (loss, aux)`` comes from
    :func:`diffusion_jax.losses.make_loss_fn`. Metrics: ``loss``, ``grad_norm``, and
    ``finite`` (False when the loss or a gradient is NaN or Inf; the caller stops the run then,
    before the state is saved).
    """
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(state.rng, state.step)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = jax.tree_util.tree_map(
            lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)))
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
        }
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                                  opt_state=opt_state)
        return new_state, metrics

    return train_step
