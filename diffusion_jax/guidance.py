"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans 2021).

:func:`classifier_free_guidance` turns a conditional denoiser ``model_fn(x_t, t, cond) -> x0_hat``
into an ordinary ``denoise_fn(x_t, t) -> x0_hat`` that samplers accept. The conditional and the
unconditional (or negative) branch are evaluated in one batched call of ``model_fn``.

Guidance is applied to the x0 estimate. For a fixed ``x_t`` the eps, v and flow predictions are
affine functions of ``x0_hat`` with the same coefficients for both branches, so
``uncond + scale * (cond - uncond)`` gives the same result in any of those spaces. Guidance rescale
(Lin et al. 2023, Section 3.4, Eq. 15-16) is not affine, so its space is a choice: ``"x0"`` by
default, or ``"eps"`` / ``"v"`` (which need the schedule).

:func:`windowed_control` applies a ControlNet's conditioning only over a chosen fraction of the
sampler's steps (diffusers' ``control_guidance_start`` / ``control_guidance_end``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import parameterization as param_lib
from diffusion_jax import schedules as schedules_lib

__all__ = ["classifier_free_guidance", "combine", "rescale_guidance", "control_window",
           "windowed_control"]

_RESCALE_SPACES = ("x0", "eps", "v")


def combine(cond_out, uncond_out, scale):
    """Classifier-free guidance of two predictions: uncond + scale * (cond - uncond).

    Written as cond + (scale - 1)(cond - uncond) so that scale = 1 returns the conditional
    prediction exactly."""
    return cond_out + (scale - 1.0) * (cond_out - uncond_out)


def rescale_guidance(guided, cond_out, phi):
    """Guidance rescale (Lin et al. 2023, Eq. 15-16).

    Match the per-example standard deviation of the guided prediction to the conditional one, then
    blend with weight ``phi``."""
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond_out, axis=axes, keepdims=True)
    std_guided = jnp.std(guided, axis=axes, keepdims=True)
    rescaled = guided * (std_cond / jnp.maximum(std_guided, jnp.finfo(guided.dtype).tiny))
    return phi * rescaled + (1.0 - phi) * guided


def _concat_batch(a, b):
    return jax.tree_util.tree_map(lambda u, v: jnp.concatenate([u, v], axis=0), a, b)


@functools.lru_cache(maxsize=None)
def _guided(rescale_space, schedule):
    """The guided denoiser for one static configuration, cached.

    Equal settings give the same function object, so samplers reuse their compiled programs."""

    def guided(model_fn, both, scale, rescale, x_t, t):
        batch = x_t.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.promote_types(x_t.dtype, jnp.float32)), (batch,))
        x0_both = model_fn(
            jnp.concatenate([x_t, x_t], axis=0), jnp.concatenate([t, t], axis=0), both
        )
        x0_cond, x0_uncond = x0_both[:batch], x0_both[batch:]
        guided_x0 = combine(x0_cond, x0_uncond, scale.astype(x0_cond.dtype))
        if rescale_space is None:
            return guided_x0
        phi = rescale.astype(x0_cond.dtype)
        if rescale_space == "x0":
            return rescale_guidance(guided_x0, x0_cond, phi)
        alpha = param_lib.broadcast_to(schedule.alpha(t), x_t)
        sigma = param_lib.broadcast_to(schedule.sigma(t), x_t)
        space = param_lib.get(rescale_space)
        out_guided = space.from_x0(guided_x0, x_t, alpha, sigma)
        out_cond = space.from_x0(x0_cond, x_t, alpha, sigma)
        rescaled = space.to_x0(rescale_guidance(out_guided, out_cond, phi), x_t, alpha, sigma)
        # Where alpha = 0 an eps (or v at sigma = 1) prediction no longer determines x0: keep the
        # plain guided estimate there instead of dividing by zero.
        return jnp.where(alpha > 0, rescaled, guided_x0)

    return guided


def classifier_free_guidance(
    model_fn: Callable[..., jax.Array],
    *,
    cond: Any,
    uncond: Any = None,
    scale,
    rescale: float = 0.0,
    negative: Any = None,
    rescale_space: str = "x0",
    schedule: Optional[Any] = None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Return ``denoise_fn(x_t, t)`` guided by ``scale``.

    Args:
      model_fn: ``model_fn(x_t, t, cond) -> x0_hat``; ``cond`` is any pytree whose leaves have the
        batch as their first axis. A ``jax.tree_util.Partial`` (e.g. from
        :func:`~diffusion_jax.parameterization.make_denoise_fn`) keeps its parameters as data.
      cond: the condition (class labels, text embeddings, ...), batch-aligned with x_t.
      uncond: the same structure holding the "no condition" input (null label, empty prompt).
      scale: guidance scale w: 0 gives the unconditional denoiser, 1 the conditional one,
        > 1 pushes samples towards the condition.
      rescale: guidance rescale phi in [0, 1] (Lin et al. 2023); 0 disables it.
      negative: optional negative condition; when given it takes the place of ``uncond`` so that
        guidance moves away from it (negative prompting).
      rescale_space: "x0", "eps" or "v": the prediction whose standard deviation is rescaled.
      schedule: required when ``rescale_space`` is "eps" or "v".

    The result is a ``jax.tree_util.Partial`` whose leaves are the conditions, the scale and the
    rescale factor, so samplers reuse their compiled program when those change. Each call makes
    exactly one ``model_fn`` call on a batch of twice the size: conditional inputs first, then
    unconditional.
    """
    if rescale_space not in _RESCALE_SPACES:
        raise ValueError(f"rescale_space must be one of {_RESCALE_SPACES}, got {rescale_space!r}")
    if not 0.0 <= float(rescale) <= 1.0:
        raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
    if rescale and rescale_space != "x0" and schedule is None:
        raise ValueError(f"rescale_space={rescale_space!r} needs the schedule (schedule=...)")
    other = uncond if negative is None else negative
    if other is None:
        raise ValueError("give the unconditional input (uncond=...) or a negative condition")
    cond_structure = jax.tree_util.tree_structure(cond)
    if jax.tree_util.tree_structure(other) != cond_structure:
        raise ValueError(
            "cond and the unconditional/negative input must have the same structure, got "
            f"{cond_structure} and {jax.tree_util.tree_structure(other)}"
        )
    both = _concat_batch(cond, other)
    space = rescale_space if rescale else None
    impl = _guided(space, schedules_lib.get(schedule) if space not in (None, "x0") else None)
    dynamic = (both, jnp.asarray(scale, jnp.float32), jnp.asarray(rescale, jnp.float32))
    if isinstance(model_fn, jax.tree_util.Partial):
        return jax.tree_util.Partial(impl, model_fn, *dynamic)
    return jax.tree_util.Partial(functools.partial(impl, model_fn), *dynamic)


def control_window(num_steps: int, start: float = 0.0, end: float = 1.0) -> np.ndarray:
    """Per step, 1 where a ControlNet acts and 0 where it does not: float32 [num_steps].

    Step i of N acts unless ``i / N < start`` or ``(i + 1) / N > end`` (diffusers'
    ``control_guidance_start`` and ``control_guidance_end``, fractions of the steps)."""
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"the control window needs 0 <= start < end <= 1, got start={start} "
                         f"and end={end}")
    steps = np.arange(num_steps)
    outside = (steps / num_steps < start) | ((steps + 1) / num_steps > end)
    return np.where(outside, 0.0, 1.0).astype(np.float32)


def _windowed(model_fn, t_high, t_low, x_t, t, cond):
    t_high, t_low = t_high.astype(t.dtype), t_low.astype(t.dtype)
    weight = ((t <= t_high) & (t > t_low)).astype(cond["control_scale"].dtype)
    return model_fn(x_t, t, {**cond, "control_scale": cond["control_scale"] * weight[:, None]})


def windowed_control(model_fn, network_times, weights):
    """``model_fn(x_t, t, cond)`` with the control scales zeroed outside the window's steps.

    ``cond["control_scale"]`` is [batch, ControlNets]; the window's steps are those where
    ``weights`` (:func:`control_window`) is 1.

    ``network_times`` are the N network times of the steps the sampler runs (its grid without
    the final time). The window is the time interval from the first acting step's time down to
    the next step after the last acting one (excluded): for the samplers that evaluate the
    network once per step, at the step's time, that is exactly diffusers' per-step window. A
    second-order corrector evaluated at the end of the last acting step, and an EDM churn that
    lifts the first acting step's time, fall outside it. A ``Partial`` stays data to samplers.
    """
    network_times = np.asarray(network_times, np.float64)
    weights = np.asarray(weights)
    if network_times.shape != weights.shape:
        raise ValueError(f"{weights.shape[0]} window weights for {network_times.shape[0]} "
                         "network times")
    acting = np.flatnonzero(weights)
    if len(acting) and len(acting) != acting[-1] - acting[0] + 1:
        raise ValueError(f"the control window must be one run of steps, got weights {weights}")
    if len(acting) == 0:
        t_high, t_low = -np.inf, np.inf  # acts nowhere
    else:
        t_high = network_times[acting[0]]
        t_low = network_times[acting[-1] + 1] if acting[-1] + 1 < len(weights) else -np.inf
    # Strongly typed (float64 where x64 is on), so that every window compiles one program.
    bounds = (jnp.asarray(np.float64(t_high)), jnp.asarray(np.float64(t_low)))
    if isinstance(model_fn, jax.tree_util.Partial):
        return jax.tree_util.Partial(_windowed, model_fn, *bounds)
    return jax.tree_util.Partial(functools.partial(_windowed, model_fn), *bounds)
