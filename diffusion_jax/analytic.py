"""Data distributions whose ideal denoiser is known in closed form.

They make it possible to check samplers, losses and schedules exactly, without training: with the
exact ``E[x0 | x_t]`` a sampler's only error is its discretisation error, and the probability-flow
ODE can be solved analytically for Gaussian data.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import schedules as schedules_lib

__all__ = ["DiagonalGaussian", "GaussianMixture", "gaussian_w2"]


def _coefficients(schedule, t, like):
    t = jnp.broadcast_to(jnp.asarray(t, like.dtype), like.shape[:1])
    shape = t.shape + (1,) * (like.ndim - 1)
    return schedule.alpha(t).reshape(shape), schedule.sigma(t).reshape(shape)


@dataclasses.dataclass(frozen=True, eq=False)
class DiagonalGaussian:
    """x0 ~ N(mean, diag(var)); arrays of shape [dim]."""

    mean: np.ndarray
    var: np.ndarray

    def posterior_mean(self, x_t, alpha, sigma):
        """E[x0 | x_t] = mu + alpha var / (alpha^2 var + sigma^2) (x_t - alpha mu)."""
        mean, var = jnp.asarray(self.mean, x_t.dtype), jnp.asarray(self.var, x_t.dtype)
        return mean + alpha * var / (alpha**2 * var + sigma**2) * (x_t - alpha * mean)

    def posterior_var(self, alpha, sigma):
        """Var[x0 | x_t] per dimension: var sigma^2 / (alpha^2 var + sigma^2)."""
        var = jnp.asarray(self.var)
        return var * sigma**2 / (alpha**2 * var + sigma**2)

    def denoiser(self, schedule) -> Callable[[jax.Array, jax.Array], jax.Array]:
        """The exact ``denoise_fn(x_t, t)`` under ``schedule``."""
        schedule = schedules_lib.get(schedule)

        def denoise_fn(x_t, t):
            alpha, sigma = _coefficients(schedule, t, x_t)
            return self.posterior_mean(x_t, alpha, sigma)

        return denoise_fn

    def ode_solution(self, schedule, x_start, t_start, t_end):
        """Exact probability-flow ODE map from time t_start to t_end.

        The marginal at t is N(alpha mu, alpha^2 var + sigma^2) per dimension, and the flow moves
        each coordinate monotonically, so the standardised value
        (x_t - alpha mu) / sqrt(alpha^2 var + sigma^2) is constant along every trajectory.
        """
        schedule = schedules_lib.get(schedule)
        mean, var = jnp.asarray(self.mean, x_start.dtype), jnp.asarray(self.var, x_start.dtype)
        a0, s0 = _coefficients(schedule, t_start, x_start)
        a1, s1 = _coefficients(schedule, t_end, x_start)
        z = (x_start - a0 * mean) / jnp.sqrt(a0**2 * var + s0**2)
        return a1 * mean + jnp.sqrt(a1**2 * var + s1**2) * z

    def sample(self, key, num):
        mean, var = jnp.asarray(self.mean), jnp.asarray(self.var)
        return mean + jnp.sqrt(var) * jax.random.normal(key, (num,) + mean.shape, mean.dtype)


def gaussian_w2(samples, mean, var):
    """2-Wasserstein distance between N(mean, diag(var)) and a Gaussian fitted to ``samples``.

    The fitted Gaussian is diagonal, with the mean and per-dimension variance of ``samples``
    [n, dim]: W2^2 = |m1 - m2|^2 + sum (sqrt(v1) - sqrt(v2))^2."""
    samples = np.asarray(samples, dtype=np.float64)
    m = samples.mean(axis=0)
    v = samples.var(axis=0)
    return float(np.sqrt(np.sum((m - mean) ** 2) + np.sum((np.sqrt(v) - np.sqrt(var)) ** 2)))


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianMixture:
    """x0 ~ sum_k weights_k N(means_k, var_k I); means of shape [K, dim], var of shape [K]."""

    weights: np.ndarray
    means: np.ndarray
    var: np.ndarray

    def denoiser(self, schedule) -> Callable[[jax.Array, jax.Array], jax.Array]:
        """The exact denoiser E[x0 | x_t] of the mixture under ``schedule``.

        The per-component posterior means weighted by the posterior probabilities of the
        components, softmax_k(log w_k + log N(x_t; alpha mu_k, s_k^2 I)) with
        s_k^2 = alpha^2 var_k + sigma^2."""
        schedule = schedules_lib.get(schedule)

        def denoise_fn(x_t, t):
            dtype = x_t.dtype
            weights = jnp.asarray(self.weights, dtype)
            means = jnp.asarray(self.means, dtype)  # [K, D]
            var = jnp.asarray(self.var, dtype)  # [K]
            alpha, sigma = _coefficients(schedule, t, x_t)  # [B, 1]
            dim = x_t.shape[-1]
            s2 = alpha**2 * var[None, :] + sigma**2  # [B, K]
            diff = x_t[:, None, :] - alpha[:, :, None] * means[None]  # [B, K, D]
            log_prob = (
                jnp.log(weights)[None]
                - 0.5 * jnp.sum(diff**2, axis=-1) / s2
                - 0.5 * dim * jnp.log(s2)
            )
            resp = jax.nn.softmax(log_prob, axis=-1)  # [B, K]
            gain = alpha * var[None, :] / s2  # [B, K]
            component_mean = means[None] + gain[:, :, None] * diff  # [B, K, D]
            return jnp.sum(resp[:, :, None] * component_mean, axis=1)

        return denoise_fn

    def sample(self, key, num):
        key_k, key_n = jax.random.split(key)
        comp = jax.random.choice(key_k, len(self.weights), (num,), p=jnp.asarray(self.weights))
        means = jnp.asarray(self.means)[comp]
        std = jnp.sqrt(jnp.asarray(self.var))[comp][:, None]
        return means + std * jax.random.normal(key_n, means.shape, means.dtype)

    def assign(self, x):
        """Index of the nearest component mean for each row of x."""
        d = np.sum((np.asarray(x)[:, None, :] - np.asarray(self.means)[None]) ** 2, axis=-1)
        return np.argmin(d, axis=1)
