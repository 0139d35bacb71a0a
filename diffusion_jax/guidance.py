"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans 2021).

:func:`classifier_free_guidance` turns a conditional denoiser ``model_fn(x_t, t, cond) -> x0_hat``
into an ordinary ``denoise_fn(x_t, t) -> x0_hat`` that samplers accept. The conditional and the
unconditional (or negative) branch are evaluated in one batched call of ``model_fn``.

Guidance is applied to the x0 estimate. For a fixed ``x_t`` the eps, v and flow predictions are
affine functions of ``x0_hat`` with the same coefficients for both branches, so
``uncond + scale * (cond - uncond)`` gives the same result in any of those spaces. Guidance rescale
(Lin et al. 2023, Section 3.4, Eq. 15-16) is not affine, so its space is a choice: ``"x0"`` by
default, or ``"eps"`` / ``"v"`` (which need the schedule).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from diffusion_jax import parameterization as param_lib
from diffusion_jax import schedules as schedules_lib

__all__ = ["classifier_free_guidance", "combine", "rescale_guidance"]

_RESCALE_SPACES = ("x0", "eps", "v")


def combine(cond_out, uncond_out, scale):
    """uncond + scale * (cond - uncond), written as cond + (scale - 1)(cond - uncond) so that
    scale = 1 returns the conditional prediction exactly."""
    return cond_out + (scale - 1.0) * (cond_out - uncond_out)


def rescale_guidance(guided, cond_out, phi):
    """Guidance rescale (Lin et al. 2023, Eq. 15-16): match the per-example standard deviation of
    the guided prediction to the conditional one, then blend with weight ``phi``."""
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond_out, axis=axes, keepdims=True)
    std_guided = jnp.std(guided, axis=axes, keepdims=True)
    rescaled = guided * (std_cond / jnp.maximum(std_guided, jnp.finfo(guided.dtype).tiny))
    return phi * rescaled + (1.0 - phi) * guided


def _concat_batch(a, b):
    return jax.tree_util.tree_map(lambda u, v: jnp.concatenate([u, v], axis=0), a, b)


def classifier_free_guidance(
    model_fn: Callable[..., jax.Array],
    *,
    cond: Any,
    uncond: Any,
    scale,
    rescale: float = 0.0,
    negative: Any = None,
    rescale_space: str = "x0",
    schedule: Optional[Any] = None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Return ``denoise_fn(x_t, t)`` guided by ``scale``.

    Args:
      model_fn: ``model_fn(x_t, t, cond) -> x0_hat``; ``cond`` is any pytree whose leaves have the
        batch as their first axis.
      cond: the condition (class labels, text embeddings, ...), batch-aligned with x_t.
      uncond: the same structure holding the "no condition" input (null label, empty prompt).
      scale: guidance scale w: 0 gives the unconditional denoiser, 1 the conditional one,
        > 1 pushes samples towards the condition. May be a traced value.
      rescale: guidance rescale phi in [0, 1] (Lin et al. 2023); 0 disables it.
      negative: optional negative condition; when given it replaces ``uncond`` so that guidance
        moves away from it (negative prompting).
      rescale_space: "x0", "eps" or "v": the prediction whose standard deviation is rescaled.
      schedule: required when ``rescale_space`` is "eps" or "v".

    Each call of the returned function makes exactly one ``model_fn`` call on a batch of twice the
    size: conditional inputs first, then unconditional.
    """
    if rescale_space not in _RESCALE_SPACES:
        raise ValueError(f"rescale_space must be one of {_RESCALE_SPACES}, got {rescale_space!r}")
    if not 0.0 <= float(rescale) <= 1.0:
        raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
    if rescale and rescale_space != "x0" and schedule is None:
        raise ValueError(f"rescale_space={rescale_space!r} needs the schedule (schedule=...)")
    if schedule is not None:
        schedule = schedules_lib.get(schedule)
    other = uncond if negative is None else negative
    cond_leaves = jax.tree_util.tree_structure(cond)
    if jax.tree_util.tree_structure(other) != cond_leaves:
        raise ValueError(
            "cond and the unconditional/negative input must have the same structure, got "
            f"{cond_leaves} and {jax.tree_util.tree_structure(other)}"
        )
    both = _concat_batch(cond, other)

    def denoise_fn(x_t, t):
        batch = x_t.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.promote_types(x_t.dtype, jnp.float32)), (batch,))
        x0_both = model_fn(
            jnp.concatenate([x_t, x_t], axis=0), jnp.concatenate([t, t], axis=0), both
        )
        x0_cond, x0_uncond = x0_both[:batch], x0_both[batch:]
        guided = combine(x0_cond, x0_uncond, jnp.asarray(scale, x0_cond.dtype))
        if not rescale:
            return guided
        if rescale_space == "x0":
            return rescale_guidance(guided, x0_cond, rescale)
        alpha = param_lib.broadcast_to(schedule.alpha(t), x_t)
        sigma = param_lib.broadcast_to(schedule.sigma(t), x_t)
        space = param_lib.get(rescale_space)
        out_guided = space.from_x0(guided, x_t, alpha, sigma)
        out_cond = space.from_x0(x0_cond, x_t, alpha, sigma)
        return space.to_x0(rescale_guidance(out_guided, out_cond, rescale), x_t, alpha, sigma)

    return denoise_fn
