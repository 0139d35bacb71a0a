"""What a network predicts, and how its output becomes an estimate of clean data.

With ``x_t = alpha * x0 + sigma * eps`` a network can be trained to output any quantity that,
together with ``x_t``, determines ``x0``:

========  =====================================================  ================================
name      network output                                        reference
========  =====================================================  ================================
``eps``   the noise ``eps``                                     Ho et al. 2020
``x0``    the clean data ``x0``
``v``     ``(alpha * eps - sigma * x0) / sqrt(alpha^2+sigma^2)``  Salimans & Ho 2022 (VP: the usual v)
``flow``  the velocity ``eps - x0``                             rectified flow (Liu et al. 2022)
``edm``   ``F`` in ``x0 = c_skip x_t/alpha + c_out F(c_in x_t/alpha, c_noise)``  Karras et al. 2022
========  =====================================================  ================================

Every conversion is written to stay finite at the ends of a schedule (sigma = 0 or alpha = 0),
except that an ``eps`` prediction cannot determine ``x0`` where alpha = 0 (zero terminal SNR;
Lin et al. 2023 recommend ``v`` there): ``alpha`` is floored at 1e-6 so the result stays finite,
and :func:`make_denoise_fn` refuses that combination.

:func:`make_denoise_fn` turns a network's apply function into the ``denoise_fn(x_t, t) -> x0_hat``
that samplers and guidance use.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffusion_jax import schedules as schedules_lib

__all__ = ["Parameterization", "TARGETS", "get", "convert", "make_denoise_fn", "broadcast_to"]

TARGETS = ("eps", "x0", "v", "flow", "edm")

# |logSNR| beyond this is treated as this for quantities that must stay finite (loss weights and
# EDM's c_noise); exp(40) ~ 2e17.
LOGSNR_CLIP = 40.0
_ALPHA_FLOOR = 1e-6


def broadcast_to(value, x):
    """Reshape a per-example quantity of shape [batch] (or a scalar) to broadcast against x."""
    value = jnp.asarray(value, dtype=x.dtype)
    if value.ndim == 0:
        return value
    return value.reshape(value.shape + (1,) * (x.ndim - value.ndim))


def _safe(v, floor):
    return jnp.maximum(v, jnp.asarray(floor, v.dtype))


@dataclasses.dataclass(frozen=True)
class Parameterization:
    """A prediction target. ``sigma_data`` is used by ``edm`` only.

    All methods take ``alpha`` and ``sigma`` already broadcast against ``x`` (see
    :func:`broadcast_to`) except :meth:`network_inputs` and :meth:`log_mse_ratio`, which take the
    per-example values.
    """

    name: str = "eps"
    sigma_data: float = 0.5

    def __post_init__(self):
        if self.name not in TARGETS:
            raise ValueError(f"unknown prediction target {self.name!r}; choose one of {TARGETS}")
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {self.sigma_data}")

    # -- EDM preconditioning (Karras et al. 2022, Table 1), written for x_t = alpha x0 + sigma eps by
    # applying it to x_t / alpha with noise level sigma / alpha; every factor is finite at alpha = 0.
    def edm_coefficients(self, alpha, sigma):
        """EDM's preconditioning factors (c_in, c_skip, c_out), acting on x_t itself.

        x_in = c_in * x_t and x0_hat = c_skip * x_t + c_out * F."""
        sd = self.sigma_data
        denom = sigma**2 + (alpha * sd) ** 2
        c_in = jax.lax.rsqrt(denom)
        c_skip = alpha * sd**2 / denom
        c_out = sigma * sd * c_in
        return c_in, c_skip, c_out

    def network_inputs(self, x_t, t, alpha, sigma, logsnr):
        """What the network sees: (scaled input, noise-level input of shape [batch]).

        For ``edm`` the input is ``c_in x_t`` and the noise level ``c_noise = log(sigma/alpha) / 4``
        (its log-SNR clipped to +-LOGSNR_CLIP); for the others ``x_t`` itself and the time ``t``.
        """
        if self.name == "edm":
            c_in, _, _ = self.edm_coefficients(broadcast_to(alpha, x_t), broadcast_to(sigma, x_t))
            c_noise = -jnp.clip(logsnr, -LOGSNR_CLIP, LOGSNR_CLIP) / 8.0
            return c_in * x_t, c_noise
        return x_t, t

    def target(self, x0, eps, x_t, alpha, sigma):
        """The training target for data ``x0`` noised with ``eps`` into ``x_t``."""
        if self.name == "eps":
            return eps
        if self.name == "x0":
            return x0
        if self.name == "v":
            r = jnp.sqrt(alpha**2 + sigma**2)
            return (alpha * eps - sigma * x0) / r
        if self.name == "flow":
            return eps - x0
        # EDM's F = (x0 - c_skip x_t) / c_out with x_t expanded, so that nothing is divided by
        # sigma: F = (sigma x0 - alpha sd^2 eps) / (sd sqrt(sigma^2 + alpha^2 sd^2)).
        sd = self.sigma_data
        return (sigma * x0 - alpha * sd**2 * eps) / (sd * jnp.sqrt(sigma**2 + (alpha * sd) ** 2))

    def to_x0(self, output, x_t, alpha, sigma):
        """x0 estimate from a network output."""
        if self.name == "eps":
            return (x_t - sigma * output) / _safe(alpha, _ALPHA_FLOOR)
        if self.name == "x0":
            return output
        if self.name == "v":
            r = jnp.sqrt(alpha**2 + sigma**2)
            return (alpha * x_t / r - sigma * output) / r
        if self.name == "flow":
            return (x_t - sigma * output) / (alpha + sigma)
        _, c_skip, c_out = self.edm_coefficients(alpha, sigma)
        return c_skip * x_t + c_out * output

    def from_x0(self, x0_hat, x_t, alpha, sigma):
        """The network output that corresponds to the estimate ``x0_hat`` at ``x_t``."""
        if self.name == "edm":
            _, c_skip, c_out = self.edm_coefficients(alpha, sigma)
            return (x0_hat - c_skip * x_t) / _safe(c_out, jnp.finfo(x_t.dtype).tiny)
        eps_hat = eps_from_x0(x0_hat, x_t, alpha, sigma)
        return self.target(x0_hat, eps_hat, x_t, alpha, sigma)

    def log_mse_ratio(self, logsnr):
        """log of (squared error in this target's space) / (squared error in x0) at fixed x_t.

        This is what converts a weighting defined on the x0 error into one on the target:
        eps: SNR, v: 1 + SNR, flow: (1 + sqrt(SNR))^2, edm: 1/c_out^2 = SNR + 1/sigma_data^2.
        """
        if self.name == "x0":
            return jnp.zeros_like(logsnr)
        if self.name == "eps":
            return logsnr
        if self.name == "v":
            return jax.nn.softplus(logsnr)
        if self.name == "flow":
            return 2.0 * jax.nn.softplus(logsnr / 2.0)
        return jnp.logaddexp(logsnr, -2.0 * math.log(self.sigma_data))


def eps_from_x0(x0_hat, x_t, alpha, sigma):
    """Noise implied by an x0 estimate: (x_t - alpha x0_hat) / sigma.

    sigma is floored to stay finite."""
    return (x_t - alpha * x0_hat) / _safe(sigma, jnp.finfo(x_t.dtype).tiny)


def get(name, **params) -> Parameterization:
    """The prediction target named ``name``; a Parameterization passes through.

    E.g. ``get("v")``, ``get("edm", sigma_data=0.5)``."""
    if isinstance(name, Parameterization):
        if params:
            raise ValueError("pass parameters only together with a target name")
        return name
    unknown = sorted(set(params) - {"sigma_data"})
    if unknown:
        raise ValueError(f"prediction target {name!r} got unknown parameter(s) {unknown}")
    return Parameterization(name=name, **params)


def convert(output, *, source, target, x_t, alpha, sigma):
    """Convert a prediction from one target to another at the same ``x_t``.

    ``alpha`` and ``sigma`` must already be broadcast against ``x_t``."""
    source, target = get(source), get(target)
    x0_hat = source.to_x0(output, x_t, alpha, sigma)
    return target.from_x0(x0_hat, x_t, alpha, sigma)


@functools.lru_cache(maxsize=None)
def _denoiser(schedule, parameterization):
    """The denoising function for one (schedule, target) pair, cached.

    Equal settings give the same function object and therefore reuse compiled samplers."""

    def denoise(apply_fn, x_t, t, *args, **kwargs):
        # Times and coefficients in at least float32, whatever the data dtype.
        dtype = jnp.promote_types(x_t.dtype, jnp.float32)
        x = x_t.astype(dtype)
        t = jnp.broadcast_to(jnp.asarray(t, dtype), x_t.shape[:1])
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        logsnr = schedule.logsnr(t)
        x_in, noise_input = parameterization.network_inputs(x, t, alpha, sigma, logsnr)
        output = apply_fn(x_in, noise_input, *args, **kwargs)
        if output.shape != x_t.shape:
            raise ValueError(
                f"the network returned shape {output.shape} for input {x_t.shape}; a denoiser "
                "must predict one value per input element"
            )
        x0_hat = parameterization.to_x0(
            output.astype(dtype), x, broadcast_to(alpha, x), broadcast_to(sigma, x)
        )
        return x0_hat.astype(x_t.dtype)

    return denoise


def make_denoise_fn(
    apply_fn: Callable[..., Any],
    schedule,
    parameterization,
) -> Callable[..., jax.Array]:
    """Wrap a network into ``denoise_fn(x_t, t, *args, **kwargs) -> x0_hat``.

    ``apply_fn(x_in, noise_input, *args, **kwargs)`` is the network with its parameters bound;
    extra arguments such as class labels are passed through. ``t`` has shape [batch] (a scalar is
    broadcast). See :meth:`Parameterization.network_inputs` for what the network receives.

    Bind the parameters with ``jax.tree_util.Partial(model.apply, params)``: the result is then a
    ``Partial`` whose leaves are the parameters, and samplers treat them as data, so new
    parameters (a later checkpoint, the EMA copy) reuse the compiled sampler instead of being
    baked into a new one. Any other callable works too but is compiled once per function object.

    An ``eps`` prediction cannot determine x0 where alpha = 0, so it is refused for schedules with
    zero terminal SNR at their ``t_max`` (Lin et al. 2023 use ``v`` there).
    """
    schedule = schedules_lib.get(schedule)
    parameterization = get(parameterization)
    if parameterization.name == "eps":
        with jax.ensure_compile_time_eval():
            terminal_alpha = float(schedule.alpha(jnp.asarray(schedule.t_max, jnp.float32)))
        if terminal_alpha == 0.0:
            raise ValueError(
                f"an eps-predicting network cannot denoise at t_max={schedule.t_max} of schedule "
                f"{schedule.name!r}, where alpha = 0 (zero terminal SNR): predict 'v', 'flow' or "
                "'x0' instead, or use a schedule whose t_max keeps alpha > 0"
            )
    impl = _denoiser(schedule, parameterization)
    if isinstance(apply_fn, jax.tree_util.Partial):
        return jax.tree_util.Partial(impl, apply_fn)
    return jax.tree_util.Partial(functools.partial(impl, apply_fn))
