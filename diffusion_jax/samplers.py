"""The reverse process: samplers over a denoiser, each one jit-compiled ``lax.scan``.

A sampler sees the model only through ``denoise_fn(x_t, t) -> x0_hat`` (batched, ``t`` of shape
[batch]) and walks a decreasing time grid ``t_0 = t_max > t_1 > ... > t_{N-1} >= t_min`` followed by
a final step to clean data (``sigma = 0``; recorded as ``t = 0`` in :attr:`SampleResult.times`).

All updates are written in the variables ``x_t = alpha x0 + sigma eps`` with ratios of alpha and
sigma (or differences of log-SNR) rather than with ``x_t / alpha``, so every method stays finite at
both ends: at the final step (sigma -> 0, log-SNR -> +inf) and when sampling starts from pure noise
(alpha = 0, zero terminal SNR). In the notation of EDM (Karras et al. 2022) the probability-flow ODE
of any schedule is ``d xbar / d sigmabar = (xbar - D(x; t)) / sigmabar`` with ``xbar = x / alpha`` and
``sigmabar = sigma / alpha = exp(-logSNR / 2)``; the methods below are steps of that ODE (or of its
reverse SDE) mapped back to ``x``.

Public API: :func:`sample`, :func:`time_grid`, :data:`METHODS`, :data:`GRIDS`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import schedules as schedules_lib

__all__ = ["METHODS", "GRIDS", "SampleResult", "sample", "time_grid", "number_of_evaluations"]

# Option names and defaults of each method.
_OPTIONS = {
    "ddpm": {},
    "ddim": {"eta": 0.0},
    "euler": {},
    "euler_ancestral": {"eta": 1.0, "s_noise": 1.0},
    "heun": {"s_churn": 0.0, "s_min": 0.0, "s_max": float("inf"), "s_noise": 1.0},
    "dpmpp_2m": {},
}
METHODS = tuple(_OPTIONS)
GRIDS = ("uniform", "trailing", "logsnr", "karras")

# Where the schedule reaches zero SNR, the log-SNR and Karras grids space their points as if the
# first time had EDM's sigma_max = 80 (log-SNR -8.76); the first point itself stays at t_max, where
# the sampler starts from pure noise.
_GRID_LOGSNR_FLOOR = -2.0 * math.log(80.0)


class SampleResult(NamedTuple):
    """What :func:`sample` returns.

    samples: the generated batch, shape and dtype of the noise.
    nfe: number of ``denoise_fn`` evaluations per sample (a Python int).
    times: the N network times followed by 0, which stands for the final clean state (sigma = 0;
        for VE and EDM, whose sigma(0) = sigma_min, the last network time may also be 0).
    trajectory: the states x at every grid time, shape [N + 1, *noise.shape], when asked for
        (``return_trajectory=True``); the first is the scaled prior sample, the last the output.
    """

    samples: jax.Array
    nfe: int
    times: np.ndarray
    trajectory: Optional[jax.Array] = None


# --------------------------------------------------------------------------------------------
# Time grids.
# --------------------------------------------------------------------------------------------


def _eager(fn, t):
    with jax.ensure_compile_time_eval():
        return np.array(fn(jnp.asarray(t)), dtype=np.float64)


def _make_time_grid(
    schedule,
    num_steps: int,
    grid: str = "uniform",
    *,
    t_min: Optional[float] = None,
    t_max: Optional[float] = None,
    rho: float = 7.0,
    snap: Optional[bool] = None,
) -> np.ndarray:
    """The N + 1 times a sampler visits: N network times from ``t_max`` down, then the final clean
    state, recorded as 0 (sigma = 0 there by definition, whatever the schedule gives at t = 0).

    grid:
      ``uniform``  N times evenly spaced in t from t_max to t_min (diffusers' "linspace" spacing);
      ``trailing`` t_max * (1 - i / N), i = 0..N-1: the last network step starts at t_max / N and
                   goes straight to clean data (Lin et al. 2023, Table 2);
      ``logsnr``   evenly spaced in log-SNR between t_max and t_min (Lu et al. 2022, DPM-Solver);
      ``karras``   sigmabar^(1/rho) evenly spaced (Karras et al. 2022, Eq. 5).
    For discrete-time schedules ``snap`` (default on for ``uniform`` and ``trailing``) rounds the
    times to the training lattice i / T.
    """
    schedule = schedules_lib.get(schedule)
    if grid not in GRIDS:
        raise ValueError(f"unknown time grid {grid!r}; choose one of {GRIDS}")
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    num_steps = int(num_steps)
    if grid == "trailing" and t_min is not None:
        raise ValueError("the 'trailing' grid runs down to clean data; it takes no t_min")
    t_min = float(schedule.t_min if t_min is None else t_min)
    t_max = float(schedule.t_max if t_max is None else t_max)
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    if grid in ("logsnr", "karras") and not np.isfinite(_eager(schedule.logsnr, t_min)):
        raise ValueError(
            f"the {grid!r} grid needs a finite log-SNR at t_min; schedule {schedule.name!r} has "
            f"an infinite one at t_min={t_min}: pass a positive t_min"
        )

    if num_steps == 1:
        times = np.array([t_max])
    elif grid == "uniform":
        times = np.linspace(t_max, t_min, num_steps)
    elif grid == "trailing":
        times = t_max * (1.0 - np.arange(num_steps) / num_steps)
    else:
        lam_hi = float(_eager(schedule.logsnr, t_min))
        lam_lo = float(_eager(schedule.logsnr, t_max))
        if not np.isfinite(lam_lo):
            lam_lo = min(_GRID_LOGSNR_FLOOR, lam_hi - 1.0)
        if grid == "logsnr":
            lam = np.linspace(lam_lo, lam_hi, num_steps)
        else:
            s_max, s_min = math.exp(-lam_lo / 2), math.exp(-lam_hi / 2)
            ramp = np.linspace(0.0, 1.0, num_steps)
            sig = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
            lam = -2.0 * np.log(sig)
        times = _eager(schedule.t_from_logsnr, lam).copy()
        times[0], times[-1] = t_max, t_min

    if snap is None:
        snap = schedule.num_timesteps is not None and grid in ("uniform", "trailing")
    if snap:
        if schedule.num_timesteps is None:
            raise ValueError(f"snap=True needs a discrete-time schedule; {schedule.name!r} is not")
        big_t = schedule.num_timesteps
        times = np.round(times * big_t) / big_t
    return _finish_grid(schedule, times, f"the {grid!r} grid with {num_steps} steps")


def _finish_grid(schedule, network_times, what):
    """Validate N decreasing network times and append the final clean state (recorded as t = 0)."""
    times = np.asarray(network_times, dtype=np.float64)
    if times.ndim != 1 or times.size < 1:
        raise ValueError(f"{what} must be a 1-D sequence of at least one time")
    if times[0] > 1.0 or times[-1] < 0.0 or np.any(np.diff(times) >= 0):
        raise ValueError(
            f"{what} must be strictly decreasing times in [0, 1], got {times} (too many steps "
            "for a discrete schedule's resolution?)"
        )
    if not np.all(_eager(schedule.sigma, times) > 0):
        raise ValueError(
            f"{what} contains a time where schedule {schedule.name!r} has sigma = 0: leave it out, "
            "the final step to clean data is always added"
        )
    return np.concatenate([times, [0.0]])


# --------------------------------------------------------------------------------------------
# Per-grid quantities and step functions.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything about a sampling run that fixes the compiled program."""

    denoise_fn: Optional[Callable[..., Any]]  # None: passed as a pytree argument instead
    schedule: Any
    method: str
    options: tuple
    return_trajectory: bool
    output_dtype: Any


def _grid_coefficients(schedule, times, dtype):
    """alpha, sigma, logSNR at every grid time; the last entry is clean data by definition."""
    t = jnp.asarray(times, dtype)
    alpha = schedule.alpha(t).at[-1].set(1.0)
    sigma = schedule.sigma(t).at[-1].set(0.0)
    logsnr = schedule.logsnr(t).at[-1].set(jnp.inf)
    return t, alpha, sigma, logsnr


def _eps_hat(x, x0_hat, alpha, sigma):
    return (x - alpha * x0_hat) / sigma


def _first_order_step(x0_hat, eps_hat, alpha_next, sigma_next, noise_fraction, noise):
    """x_next = alpha' x0_hat + sigma' (sqrt(1 - u^2) eps_hat + u z).

    With u = 0 this is Euler's method in (sigmabar, xbar) (EDM Algorithm 1 with s = alpha), i.e.
    DDIM with eta = 0 (Song et al. 2021, Eq. 12): xbar' = xbar + (sigmabar' - sigmabar) eps_hat,
    multiplied through by alpha'. With u > 0 a fraction u of the new noise is fresh (DDIM's eta,
    DDPM's ancestral step, k-diffusion's Euler ancestral).
    """
    direction = eps_hat if noise is None else (
        jnp.sqrt(1.0 - noise_fraction**2) * eps_hat + noise_fraction * noise
    )
    return alpha_next * x0_hat + sigma_next * direction


def _fresh_noise_fraction(logsnr, logsnr_next):
    """sqrt(1 - sigmabar'^2 / sigmabar^2): the share of sigma' that the DDPM posterior
    q(x_s | x_t, x0) draws afresh (Ho et al. 2020, Eq. 7; equal to DDIM's eta = 1)."""
    return jnp.sqrt(-jnp.expm1(logsnr - logsnr_next))


def _method_noise_fraction(method, options, logsnr, logsnr_next):
    if method == "euler":
        return None
    fraction = _fresh_noise_fraction(logsnr, logsnr_next)
    if method == "ddpm":
        return fraction
    if method == "ddim":
        return options["eta"] * fraction
    if method == "euler_ancestral":
        # k-diffusion's sigma_up / sigma_next, capped at 1.
        return jnp.minimum(options["eta"] * fraction, 1.0)
    raise AssertionError(method)


def _sample_impl(static: _Static, dynamic_denoise_fn, noise, key, grid_arrays):
    schedule, method = static.schedule, static.method
    options = dict(static.options)
    denoise_fn = static.denoise_fn or dynamic_denoise_fn
    # The state and the grid coefficients stay in at least float32 even for bfloat16 noise.
    dtype = jnp.promote_types(noise.dtype, jnp.float32)
    noise = noise.astype(dtype)
    times, flags = grid_arrays
    num_steps = times.shape[0] - 1
    t, alpha, sigma, logsnr = _grid_coefficients(schedule, times, dtype)

    x_init = noise * jnp.sqrt(alpha[0] ** 2 + sigma[0] ** 2)
    batch = noise.shape[0]

    def evaluate(x, t_value):
        x0_hat = denoise_fn(x, jnp.full((batch,), t_value, dtype))
        if x0_hat.shape != x.shape:
            raise ValueError(
                f"denoise_fn returned shape {x0_hat.shape} for x_t of shape {x.shape}; it must "
                "return x0_hat shaped like x_t"
            )
        return x0_hat.astype(dtype)

    keys = jax.random.split(key, num_steps) if key is not None else jnp.zeros((num_steps,))
    per_step = {
        "t": t[:-1],
        "t_next": t[1:],
        "alpha": alpha[:-1],
        "alpha_next": alpha[1:],
        "sigma": sigma[:-1],
        "sigma_next": sigma[1:],
        "logsnr": logsnr[:-1],
        "logsnr_next": logsnr[1:],
        "flag": flags,
        "key": keys,
    }

    if method in ("ddpm", "ddim", "euler", "euler_ancestral"):
        stochastic = _is_stochastic(method, options)
        scale = options.get("s_noise", 1.0)

        def step(carry, s):
            x = carry
            x0_hat = evaluate(x, s["t"])
            eps_hat = _eps_hat(x, x0_hat, s["alpha"], s["sigma"])
            noise_step = None
            fraction = None
            if stochastic:
                noise_step = scale * jax.random.normal(s["key"], x.shape, dtype)
                fraction = _method_noise_fraction(method, options, s["logsnr"], s["logsnr_next"])
            x_next = _first_order_step(
                x0_hat, eps_hat, s["alpha_next"], s["sigma_next"], fraction, noise_step
            )
            return x_next, x_next

        carry = x_init

    elif method == "heun":
        s_churn, s_min, s_max = options["s_churn"], options["s_min"], options["s_max"]
        s_noise = options["s_noise"]
        gamma_max = min(s_churn / num_steps, math.sqrt(2.0) - 1.0)

        def churn(x, s):
            """Raise the noise level to sigmahat = (1 + gamma) sigmabar by adding fresh noise
            (EDM Algorithm 2, lines 4-6), clipped to the schedule's range. Returns
            (x_hat, t_hat, alpha_hat, sigma_hat)."""
            sigmabar = jnp.exp(-0.5 * s["logsnr"])
            active = jnp.isfinite(sigmabar) & (sigmabar >= s_min) & (sigmabar <= s_max)
            gamma = jnp.where(active, gamma_max, 0.0)
            t_hat = jnp.where(
                active,
                schedule.t_from_logsnr(s["logsnr"] - 2.0 * jnp.log1p(gamma)).astype(dtype),
                s["t"],
            )
            alpha_hat = jnp.where(active, schedule.alpha(t_hat), s["alpha"])
            sigma_hat = jnp.where(active, schedule.sigma(t_hat), s["sigma"])
            z = jax.random.normal(s["key"], x.shape, dtype)
            # xhat = alpha_hat (x / alpha + sqrt(sigmahat^2 - sigmabar^2) z): the noise term is
            # sqrt(sigma_hat^2 - (alpha_hat sigmabar)^2), which needs no division by alpha_hat.
            sigmabar_safe = jnp.where(active, sigmabar, 0.0)
            extra = jnp.sqrt(jnp.maximum(sigma_hat**2 - (alpha_hat * sigmabar_safe) ** 2, 0.0))
            alpha_safe = jnp.where(active, s["alpha"], 1.0)
            x_hat = jnp.where(active, x * (alpha_hat / alpha_safe) + extra * s_noise * z, x)
            return x_hat, t_hat, alpha_hat, sigma_hat

        def step(carry, s):
            """EDM Algorithm 2 (Karras et al. 2022) in (sigmabar, xbar), mapped back to x."""
            x = carry
            if gamma_max > 0:
                x_hat, t_hat, alpha_hat, sigma_hat = churn(x, s)
            else:
                x_hat, t_hat, alpha_hat, sigma_hat = x, s["t"], s["alpha"], s["sigma"]
            x0_hat = evaluate(x_hat, t_hat)
            eps_hat = _eps_hat(x_hat, x0_hat, alpha_hat, sigma_hat)
            x_next = s["alpha_next"] * x0_hat + s["sigma_next"] * eps_hat  # Euler step

            def correct(x_euler):
                x0_next = evaluate(x_euler, s["t_next"])
                eps_next = _eps_hat(x_euler, x0_next, s["alpha_next"], s["sigma_next"])
                # xbar' = xbar_hat + (sigmabar' - sigmahat) (d + d') / 2, times alpha'.
                step_size = s["sigma_next"] - s["alpha_next"] * sigma_hat / alpha_hat
                return x_euler + 0.5 * step_size * (eps_next - eps_hat)

            x_next = jax.lax.cond(s["flag"], correct, lambda v: v, x_next)
            return x_next, x_next

        carry = x_init

    elif method == "dpmpp_2m":

        def step(carry, s):
            """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2), lambda = logSNR / 2."""
            x, x0_prev, h_prev = carry
            x0_hat = evaluate(x, s["t"])
            h = 0.5 * (s["logsnr_next"] - s["logsnr"])
            # Second order where flagged: not the first step, not the final step to sigma = 0,
            # and the previous step had a finite size (it did not start at zero SNR).
            r = jnp.where(s["flag"], h_prev / jnp.where(s["flag"], h, 1.0), 1.0)
            x0_mix = jnp.where(
                s["flag"], (1.0 + 0.5 / r) * x0_hat - (0.5 / r) * x0_prev, x0_hat
            )
            ratio = s["sigma_next"] / s["sigma"]
            x_next = ratio * x - s["alpha_next"] * jnp.expm1(-h) * x0_mix
            return (x_next, x0_hat, h), x_next

        carry = (x_init, jnp.zeros_like(x_init), jnp.asarray(1.0, dtype))
    else:  # pragma: no cover - validated in sample()
        raise AssertionError(method)

    final, path = jax.lax.scan(step, carry, per_step)
    samples = final[0] if isinstance(final, tuple) else final
    out_dtype = static.output_dtype
    trajectory = None
    if static.return_trajectory:
        trajectory = jnp.concatenate([x_init[None], path], axis=0).astype(out_dtype)
    return samples.astype(out_dtype), trajectory


_sample_jit = jax.jit(_sample_impl, static_argnums=0)


def _step_flags(method, times, schedule):
    """Per-step booleans fixed by the grid: Heun's correction step, DPM-Solver++'s second order."""
    with jax.ensure_compile_time_eval():
        logsnr = np.asarray(schedule.logsnr(jnp.asarray(times[:-1])), dtype=np.float64)
    start_finite = np.isfinite(logsnr)
    to_clean = np.zeros(len(times) - 1, dtype=bool)
    to_clean[-1] = True
    if method == "heun":
        return start_finite & ~to_clean
    if method == "dpmpp_2m":
        previous_finite = np.concatenate([[False], start_finite[:-1]])
        return previous_finite & ~to_clean
    return np.zeros(len(times) - 1, dtype=bool)


def number_of_evaluations(method, times, schedule) -> int:
    """Denoiser evaluations per sample for ``method`` on the grid ``times``."""
    num_steps = len(times) - 1
    if method == "heun":
        return num_steps + int(_step_flags(method, times, schedule).sum())
    return num_steps


def _validated_options(method, options):
    if method not in _OPTIONS:
        raise ValueError(f"unknown sampler method {method!r}; choose one of {METHODS}")
    allowed = _OPTIONS[method]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"sampler {method!r} got unknown option(s) {unknown}; it accepts "
            f"{sorted(allowed) if allowed else 'no options'}"
        )
    merged = {**allowed, **{k: float(v) for k, v in options.items()}}
    if method == "ddim" and not 0.0 <= merged["eta"] <= 1.0:
        raise ValueError(f"ddim eta must be in [0, 1], got {merged['eta']}")
    if method == "euler_ancestral" and merged["eta"] < 0:
        raise ValueError(f"euler_ancestral eta must be >= 0, got {merged['eta']}")
    if method == "heun":
        if merged["s_churn"] < 0:
            raise ValueError(f"heun s_churn must be >= 0, got {merged['s_churn']}")
        if merged["s_min"] > merged["s_max"]:
            raise ValueError("heun needs s_min <= s_max")
    return merged


def _is_stochastic(method, options):
    if method in ("ddpm", "euler_ancestral"):
        return options["eta"] > 0 if method == "euler_ancestral" else True
    if method == "ddim":
        return options["eta"] > 0
    if method == "heun":
        return options["s_churn"] > 0
    return False


def sample(
    denoise_fn: Callable[..., jax.Array],
    noise: jax.Array,
    *,
    schedule,
    method: str,
    num_steps: Optional[int] = None,
    key: Optional[jax.Array] = None,
    grid: str = "uniform",
    time_grid: Optional[Any] = None,
    t_min: Optional[float] = None,
    t_max: Optional[float] = None,
    rho: float = 7.0,
    snap: Optional[bool] = None,
    return_trajectory: bool = False,
    **options,
) -> SampleResult:
    """Generate samples by running ``method`` for ``num_steps`` steps from ``noise``.

    Args:
      denoise_fn: ``denoise_fn(x_t, t) -> x0_hat`` with ``t`` of shape [batch]; see
        :func:`diffusion_jax.parameterization.make_denoise_fn` and
        :func:`diffusion_jax.guidance.classifier_free_guidance`. When it is a
        ``jax.tree_util.Partial`` (both of those return one) its leaves, such as parameters,
        labels or the guidance scale, are passed as data and the compiled sampler is reused when
        they change; any other function is compiled once per function object.
      noise: standard normal, shape [batch, ...]; it is scaled to the schedule's prior
        (by sqrt(alpha(t_max)^2 + sigma(t_max)^2)). The samples come back in its dtype; the
        sampler's own arithmetic runs in float32 at least (float64 when the noise is float64).
      schedule: a :class:`~diffusion_jax.schedules.Schedule` or a schedule name.
      method: one of :data:`METHODS`:
        ``ddpm`` ancestral sampling from the DDPM posterior (Ho et al. 2020);
        ``ddim`` (option ``eta`` in [0, 1], default 0; Song et al. 2021);
        ``euler`` Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1);
        ``euler_ancestral`` (options ``eta`` = 1, ``s_noise`` = 1);
        ``heun`` EDM's Algorithm 2 (options ``s_churn`` = 0, ``s_min`` = 0, ``s_max`` = inf,
        ``s_noise`` = 1; the thresholds compare with sigmabar = sigma / alpha; the raised noise
        level is capped at the schedule's largest, so a step that starts at t = 1 gets no churn,
        where EDM's code would evaluate the network above sigma_max);
        ``dpmpp_2m`` DPM-Solver++(2M) (Lu et al. 2022b).
      num_steps: number of steps N (the final step to clean data included).
      key: PRNG key; required by stochastic settings.
      grid: one of :data:`GRIDS`, see :func:`time_grid`; ``t_min``, ``t_max``, ``rho`` and ``snap``
        are passed on to it.
      time_grid: the N network times (strictly decreasing, sigma > 0 at each), instead of
        ``grid``; the final step to clean data is appended.
      return_trajectory: also return every intermediate state.

    Returns:
      A :class:`SampleResult` (samples, nfe, times, trajectory).
    """
    schedule = schedules_lib.get(schedule)
    merged = _validated_options(method, options)
    noise = jnp.asarray(noise)
    if noise.ndim < 1 or not jnp.issubdtype(noise.dtype, jnp.floating):
        raise ValueError(
            f"noise must be a floating-point array of shape [batch, ...], got {noise.dtype} "
            f"of shape {noise.shape}"
        )
    if time_grid is not None:
        ignored = {"grid": grid != "uniform", "t_min": t_min is not None,
                   "t_max": t_max is not None, "rho": rho != 7.0, "snap": snap is not None}
        if any(ignored.values()):
            raise ValueError(
                f"time_grid fixes the times; do not also pass {[k for k, v in ignored.items() if v]}"
            )
        times = _finish_grid(schedule, time_grid, "time_grid")
        if num_steps is not None and num_steps != len(times) - 1:
            raise ValueError(
                f"num_steps={num_steps} disagrees with the {len(times) - 1} steps of time_grid"
            )
    else:
        if num_steps is None:
            raise ValueError("give num_steps (or an explicit time_grid)")
        times = _make_time_grid(
            schedule, num_steps, grid, t_min=t_min, t_max=t_max, rho=rho, snap=snap
        )
    if _is_stochastic(method, merged) and key is None:
        raise ValueError(f"sampler {method!r} with options {merged} is stochastic: pass key=")
    if not _is_stochastic(method, merged):
        key = None

    flags = _step_flags(method, times, schedule)
    # A jax.tree_util.Partial travels as data (its leaves, e.g. parameters, are jit arguments),
    # so new parameters reuse the compiled program; any other callable is part of the program.
    dynamic_fn = denoise_fn if isinstance(denoise_fn, jax.tree_util.Partial) else None
    static = _Static(
        denoise_fn=None if dynamic_fn is not None else denoise_fn,
        schedule=schedule,
        method=method,
        options=tuple(sorted(merged.items())),
        return_trajectory=bool(return_trajectory),
        output_dtype=jnp.dtype(noise.dtype),
    )
    time_dtype = jnp.promote_types(noise.dtype, jnp.float32)
    samples, trajectory = _sample_jit(
        static, dynamic_fn, noise, key, (jnp.asarray(times, time_dtype), jnp.asarray(flags))
    )
    return SampleResult(
        samples=samples,
        nfe=number_of_evaluations(method, times, schedule),
        times=times,
        trajectory=trajectory,
    )


time_grid = _make_time_grid
