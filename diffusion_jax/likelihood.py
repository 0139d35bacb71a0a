"""Exact likelihood of data under a diffusion model, through the probability-flow ODE.

The probability-flow ODE of ``x_t = alpha(t) x0 + sigma(t) eps`` moves a point as

    dx/dt = alpha'(t) x0_hat(x, t) + sigma'(t) (x - alpha(t) x0_hat(x, t)) / sigma(t),

which is DDIM's update in the limit of small steps (Song et al. 2021, "Score-based generative
modeling through SDEs", eq. 13, written with the denoiser instead of the score). It is a
continuous normalising flow, so by the instantaneous change of variables (Chen et al. 2018)

    log p_{t_min}(x) = log p_{t_max}(x(t_max)) + integral_{t_min}^{t_max} div f(x(t), t) dt,

integrated here in log-SNR rather than t (see :func:`_velocity`) with the classical Runge-Kutta
method (RK4) on a uniform log-SNR grid. The
divergence is exact (one Jacobian-vector product per dimension: small data only) or the
Hutchinson-Skilling estimate ``E[z^T (df/dx) z]`` with Rademacher probes ``z`` held fixed along each
trajectory (Song et al. 2021, appendix D.2), one Jacobian-vector product per probe.

As in that paper the data point is taken as the state at ``t_min`` (a small positive time, where
the noise level is ``sigma(t_min)``), and the prior at ``t_max`` is the samplers' starting
distribution N(0, (alpha(t_max)^2 + sigma(t_max)^2) I).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import parameterization as param_lib
from diffusion_jax import schedules as schedules_lib

__all__ = ["LikelihoodResult", "log_likelihood", "bits_per_dim", "ode_logsnr_grid"]

DIVERGENCES = ("hutchinson", "exact")


class LikelihoodResult(NamedTuple):
    log_likelihood: jax.Array  # [batch], nats, log p_{t_min}(x)
    prior_log_likelihood: jax.Array  # [batch], log p_{t_max}(x(t_max))
    delta_log_likelihood: jax.Array  # [batch], the integral of the divergence
    latent: jax.Array  # x(t_max)
    nfe: int  # denoiser evaluations per divergence probe (4 per RK4 step)


def ode_logsnr_grid(schedule, num_steps: int, t_min: float = 1e-3,
                    t_max: Optional[float] = None) -> np.ndarray:
    """Uniformly spaced, decreasing log-SNRs from ``t_min`` to ``t_max``.

    ``t_max`` defaults to the schedule's. The ends are clipped to +-LOGSNR_CLIP where the schedule
    reaches an infinite log-SNR."""
    schedule = schedules_lib.get(schedule)
    t_max = float(schedule.t_max if t_max is None else t_max)
    clip = param_lib.LOGSNR_CLIP
    hi = float(np.clip(schedule.logsnr(jnp.asarray(t_min)), -clip, clip))
    lo = float(np.clip(schedule.logsnr(jnp.asarray(t_max)), -clip, clip))
    return np.linspace(hi, lo, num_steps + 1)


def _velocity(denoise_fn, schedule, x, logsnr):
    """The probability-flow ODE's dx/dlogSNR at (x, logSNR), for one scalar log-SNR.

    Integrating in log-SNR rather than in t keeps the right-hand side smooth for schedules whose
    t-parameterisation has kinks (DDPM's table, interpolated linearly between its 1000 steps):
    alpha and sigma are smooth functions of the log-SNR, and dt/dlogSNR cancels the kinks."""
    t = schedule.t_from_logsnr(logsnr)
    t_batch = jnp.full((x.shape[0],), t, x.dtype)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    d_alpha, d_sigma, d_logsnr = (jax.grad(fn)(t) for fn in
                                  (schedule.alpha, schedule.sigma, schedule.logsnr))
    x0_hat = denoise_fn(x, t_batch).astype(x.dtype)
    return (d_alpha * x0_hat + d_sigma * (x - alpha * x0_hat) / sigma) / d_logsnr


@functools.partial(jax.jit, static_argnames=("static_fn", "schedule", "divergence"))
def _integrate(static_fn, dynamic_fn, schedule, divergence, x, logsnrs, probes):
    denoise_fn = static_fn if static_fn is not None else dynamic_fn
    axes = tuple(range(1, x.ndim))

    def velocity(x, logsnr):
        return _velocity(denoise_fn, schedule, x, logsnr)

    def drift_and_divergence(x, t):
        if divergence == "exact":
            flat = x.reshape(x.shape[0], -1)
            dim = flat.shape[1]

            def diagonal_entry(d):
                basis = jnp.zeros_like(flat).at[:, d].set(1.0).reshape(x.shape)
                f, jvp = jax.jvp(lambda y: velocity(y, t), (x,), (basis,))
                return f, jvp.reshape(x.shape[0], -1)[:, d]

            fs, entries = jax.lax.map(diagonal_entry, jnp.arange(dim))
            return fs[0], jnp.sum(entries, axis=0)

        def probe_divergence(z):
            f, jvp = jax.jvp(lambda y: velocity(y, t), (x,), (z,))
            return f, jnp.sum(z * jvp, axis=axes)

        fs, estimates = jax.lax.map(probe_divergence, probes)
        return fs[0], jnp.mean(estimates, axis=0)

    def rk4_step(carry, interval):
        x, delta = carry
        t0, t1 = interval[0], interval[1]
        h = t1 - t0
        k1, d1 = drift_and_divergence(x, t0)
        k2, d2 = drift_and_divergence(x + 0.5 * h * k1, t0 + 0.5 * h)
        k3, d3 = drift_and_divergence(x + 0.5 * h * k2, t0 + 0.5 * h)
        k4, d4 = drift_and_divergence(x + h * k3, t1)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        delta = delta + h / 6 * (d1 + 2 * d2 + 2 * d3 + d4)
        return (x, delta), None

    intervals = jnp.stack([logsnrs[:-1], logsnrs[1:]], axis=1)
    (latent, delta), _ = jax.lax.scan(rk4_step, (x, jnp.zeros(x.shape[:1], x.dtype)), intervals)
    t_max = schedule.t_from_logsnr(logsnrs[-1])
    prior_var = schedule.alpha(t_max) ** 2 + schedule.sigma(t_max) ** 2
    dim = math.prod(x.shape[1:])
    prior = (-0.5 * jnp.sum(latent ** 2, axis=axes) / prior_var
             - 0.5 * dim * jnp.log(2 * jnp.pi * prior_var))
    return prior + delta, prior, delta, latent


def log_likelihood(
    denoise_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x: jax.Array,
    *,
    schedule,
    num_steps: int = 64,
    t_min: float = 1e-3,
    divergence: str = "hutchinson",
    num_probes: int = 1,
    key: Optional[jax.Array] = None,
) -> LikelihoodResult:
    """log p(x) in nats per example, by integrating the probability-flow ODE.

    The ODE is integrated from ``t_min`` to the schedule's ``t_max`` in ``num_steps`` RK4 steps (see
    the module docstring). Where the schedule's log-SNR is infinite at ``t_max`` the integration
    stops at log-SNR -LOGSNR_CLIP (alpha = e^-20), whose prior is used instead.

    ``denoise_fn(x_t, t) -> x0_hat`` is the same function the samplers take (a
    ``jax.tree_util.Partial`` is passed as data, so new parameters reuse the compiled program).
    ``divergence="exact"`` costs one Jacobian-vector product per data dimension;
    ``"hutchinson"`` costs ``num_probes`` and needs ``key`` (it is unbiased, so average over
    examples or probes for a precise number). Arithmetic runs in float32 at least.
    """
    schedule = schedules_lib.get(schedule)
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if num_steps < 1 or num_probes < 1:
        raise ValueError("num_steps and num_probes must be >= 1")
    if not 0.0 < t_min < schedule.t_max:
        raise ValueError(f"t_min must be in (0, {schedule.t_max}), got {t_min}: at t = 0 the "
                         "flow's velocity divides by sigma = 0")
    x = jnp.asarray(x)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    x = x.astype(dtype)
    logsnrs = jnp.asarray(ode_logsnr_grid(schedule, num_steps, t_min), dtype)
    if divergence == "hutchinson":
        if key is None:
            raise ValueError("the Hutchinson estimator is random: pass key=")
        probes = jax.random.rademacher(key, (num_probes,) + x.shape, dtype)
    else:
        probes = jnp.zeros((1,) + x.shape, dtype)  # unused
    dynamic_fn = denoise_fn if isinstance(denoise_fn, jax.tree_util.Partial) else None
    static_fn = None if dynamic_fn is not None else denoise_fn
    logp, prior, delta, latent = _integrate(static_fn, dynamic_fn, schedule, divergence, x,
                                            logsnrs, probes)
    return LikelihoodResult(logp, prior, delta, latent, nfe=4 * num_steps)


def bits_per_dim(log_likelihood, dim: int, *, data_range: float = 2.0, levels: int = 256):
    """Negative log-likelihood in bits per dimension of discrete data from a continuous one.

    The data has ``levels`` levels and was scaled to an interval of width ``data_range`` (the
    default: 8-bit images in [-1, 1]). A density p over the scaled data gives the discrete data a
    density p * (data_range / levels)^dim per unit bin, hence
    ``-(log p / dim + log(data_range / levels)) / log 2`` (without dequantization, so it is an
    estimate, not a bound)."""
    return -(jnp.asarray(log_likelihood) / dim + math.log(data_range / levels)) / math.log(2.0)
