"""The reverse process: samplers over a denoiser, each one jit-compiled ``lax.scan``.

A sampler sees the model only through ``denoise_fn(x_t, t) -> x0_hat`` (batched, ``t`` of shape
[batch], t in [0, 1]) and walks a decreasing time grid ``t_0 = t_max > t_1 > ... > t_{N-1} >= t_min``
followed by a final step to clean data (``sigma = 0``; recorded as ``t = 0`` in
:attr:`SampleResult.times`), or, with ``t_end > 0``, to the noisy state at ``t_end`` (what
diffusers' DDIM and PNDM schedulers return with ``set_alpha_to_one=False``).

All updates are written in the variables ``x_t = alpha x0 + sigma eps`` with ratios of alpha and
sigma (or differences of log-SNR) rather than with ``x_t / alpha``, so every method stays finite at
both ends: at the final step (sigma -> 0, log-SNR -> +inf) and when sampling starts from pure noise
(alpha = 0, zero terminal SNR). In the notation of EDM (Karras et al. 2022) the probability-flow ODE
of any schedule is ``d xbar / d sigmabar = (xbar - D(x; t)) / sigmabar`` with ``xbar = x / alpha`` and
``sigmabar = sigma / alpha = exp(-logSNR / 2)``; the methods below are steps of that ODE (or of its
reverse SDE) mapped back to ``x``. The exponential integrators (DPM-Solver++, UniPC) use
``lambda = logSNR / 2`` and the exact solution ``x_t = (sigma_t / sigma_s) x_s + sigma_t
int_{lambda_s}^{lambda_t} e^lambda x0(lambda) dlambda`` (Lu et al. 2022a, Eq. 3.4, in the data
prediction form of Lu et al. 2022b).

Each method is one :class:`Method` record in :data:`METHODS_TABLE`: its options and defaults, when
it is stochastic, its per-step flags and evaluations, and its step function, a short function that
follows its paper's equation (the multistep solvers' are in :mod:`diffusion_jax.multistep`).
:func:`_sample_impl` is the frame they share: the grid's coefficients, then one ``lax.scan`` of the
step. Adding a sampler is one record and one step function (see ``docs/samplers.md``). A ``jax.tree_util.Partial`` denoiser travels as data, so new parameters
reuse the compiled program.

Public API: :func:`sample`, :func:`time_grid`, :func:`number_of_evaluations`, :data:`METHODS`,
:data:`METHODS_TABLE`, :class:`Method`, :data:`GRIDS`, :class:`SampleResult`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import multistep
from diffusion_jax.repaint import KnownRegion, check_known, jump_schedule, renoise
from diffusion_jax import schedules as schedules_lib
from diffusion_jax import time_grids
from diffusion_jax.time_grids import GRIDS, time_grid  # re-exported: part of this module's API

__all__ = ["METHODS", "METHODS_TABLE", "Method", "GRIDS", "SampleResult", "KnownRegion", "sample",
           "time_grid", "number_of_evaluations", "jump_schedule"]

class SampleResult(NamedTuple):
    """What :func:`sample` returns.

    samples: the generated batch, shape and dtype of the noise.
    nfe: number of ``denoise_fn`` evaluations per sample (a Python int).
    times: the N network times followed by 0, which stands for the final clean state (sigma = 0;
        for VE and EDM, whose sigma(0) = sigma_min, the last network time may also be 0), or by
        ``t_end`` when the sampler was asked to stop there.
    trajectory: the states x at every grid time, shape [N + 1, *noise.shape], when asked for
        (``return_trajectory=True``); the first is the scaled prior sample, the last the output.
        For ``unipc`` these are the states the network is evaluated at (before UniC's correction).
    """

    samples: jax.Array
    nfe: int
    times: np.ndarray
    trajectory: Optional[jax.Array] = None


# --------------------------------------------------------------------------------------------
# What every step function may use.
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
    known: Optional[str] = None  # None, "fresh" or "fixed" (KnownRegion.noise given)
    jumps: bool = False  # the op sequence has RePaint's renoising jumps


class _Run(NamedTuple):
    """What a step function sees besides its carry and the grid values ``s`` of its step.

    ``s`` holds ``t, alpha, sigma, logsnr`` at the step's start, the same with ``_next`` at its end
    (sigma = 0 and logsnr = +inf at the final one), the method's ``flag`` and a PRNG ``key``.
    """

    evaluate: Callable[[jax.Array, jax.Array], jax.Array]  # (x, t) -> x0_hat in the state dtype
    options: dict
    stochastic: bool
    num_steps: int
    schedule: Any
    dtype: Any


def _grid_coefficients(schedule, times, dtype):
    """alpha, sigma, logSNR at every grid time.

    A last time of 0 stands for clean data by definition (sigma = 0, whatever the schedule gives
    there); a positive last time (``t_end``) is the schedule's state there."""
    t = jnp.asarray(times, dtype)
    clean = t[-1] == 0
    alpha, sigma, logsnr = schedule.alpha(t), schedule.sigma(t), schedule.logsnr(t)
    alpha = alpha.at[-1].set(jnp.where(clean, 1.0, alpha[-1]))
    sigma = sigma.at[-1].set(jnp.where(clean, 0.0, sigma[-1]))
    logsnr = logsnr.at[-1].set(jnp.where(clean, jnp.inf, logsnr[-1]))
    return t, alpha, sigma, logsnr


def _eps_hat(x, x0_hat, alpha, sigma):
    return (x - alpha * x0_hat) / sigma


def _fresh_noise_fraction(logsnr, logsnr_next):
    """The share of sigma' that the DDPM posterior draws afresh.

    sqrt(1 - sigmabar'^2 / sigmabar^2), for q(x_s | x_t, x0) (Ho et al. 2020, Eq. 7; equal to DDIM's
    eta = 1).
    """
    return jnp.sqrt(-jnp.expm1(logsnr - logsnr_next))


# --------------------------------------------------------------------------------------------
# Step functions: step(run, carry, s) -> carry, with the state x at the step's end in carry[0].
# --------------------------------------------------------------------------------------------


def _first_order(run, carry, s, noise_fraction):
    """x' = alpha' x0_hat + sigma' (sqrt(1 - u^2) eps_hat + u z), u = noise_fraction.

    With u = 0 this is Euler's method in (sigmabar, xbar) (EDM Algorithm 1 with s = alpha), i.e.
    DDIM with eta = 0 (Song et al. 2021, Eq. 12): xbar' = xbar + (sigmabar' - sigmabar) eps_hat,
    multiplied through by alpha'. With u > 0 a fraction u of the new noise is fresh.
    """
    (x,) = carry
    x0_hat = run.evaluate(x, s["t"])
    direction = _eps_hat(x, x0_hat, s["alpha"], s["sigma"])
    if run.stochastic:
        z = run.options.get("s_noise", 1.0) * jax.random.normal(s["key"], x.shape, run.dtype)
        direction = jnp.sqrt(1.0 - noise_fraction**2) * direction + noise_fraction * z
    return (s["alpha_next"] * x0_hat + s["sigma_next"] * direction,)


def _ddpm_step(run, carry, s):
    """Ancestral sampling from the DDPM posterior (Ho et al. 2020, Eq. 6-7).

    A step of q(x_s | x_t, x0 = x0_hat): u = sqrt(1 - sigmabar'^2 / sigmabar^2) of the new noise is
    fresh.
    """
    return _first_order(run, carry, s, _fresh_noise_fraction(s["logsnr"], s["logsnr_next"]))


def _ddim_step(run, carry, s):
    """DDIM (Song et al. 2021, Eq. 12) with sigma_t(eta) of Eq. 16: u = eta times DDPM's."""
    eta = run.options["eta"]
    return _first_order(run, carry, s, eta * _fresh_noise_fraction(s["logsnr"], s["logsnr_next"]))


def _euler_step(run, carry, s):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1)."""
    return _first_order(run, carry, s, None)


def _euler_ancestral_step(run, carry, s):
    """k-diffusion's Euler ancestral step.

    An Euler step to sigma_down, then fresh noise sigma_up; in these variables u = sigma_up /
    sigmabar' = min(eta * DDPM's fraction, 1).
    """
    fraction = run.options["eta"] * _fresh_noise_fraction(s["logsnr"], s["logsnr_next"])
    return _first_order(run, carry, s, jnp.minimum(fraction, 1.0))


def _churn(run, x, s, gamma_max):
    """Raise the noise level with fresh noise (EDM Algorithm 2, lines 4-6).

    The level goes to sigmahat = (1 + gamma) sigmabar, clipped to the schedule's range. Returns
    (x_hat, t_hat, alpha_hat, sigma_hat).
    """
    s_min, s_max, s_noise = (run.options[k] for k in ("s_min", "s_max", "s_noise"))
    sigmabar = jnp.exp(-0.5 * s["logsnr"])
    active = jnp.isfinite(sigmabar) & (sigmabar >= s_min) & (sigmabar <= s_max)
    gamma = jnp.where(active, gamma_max, 0.0)
    t_hat = jnp.where(
        active,
        run.schedule.t_from_logsnr(s["logsnr"] - 2.0 * jnp.log1p(gamma)).astype(run.dtype),
        s["t"],
    )
    alpha_hat = jnp.where(active, run.schedule.alpha(t_hat), s["alpha"])
    sigma_hat = jnp.where(active, run.schedule.sigma(t_hat), s["sigma"])
    z = jax.random.normal(s["key"], x.shape, run.dtype)
    # xhat = alpha_hat (x / alpha + sqrt(sigmahat^2 - sigmabar^2) z): the noise term is
    # sqrt(sigma_hat^2 - (alpha_hat sigmabar)^2), which needs no division by alpha_hat.
    sigmabar_safe = jnp.where(active, sigmabar, 0.0)
    extra = jnp.sqrt(jnp.maximum(sigma_hat**2 - (alpha_hat * sigmabar_safe) ** 2, 0.0))
    alpha_safe = jnp.where(active, s["alpha"], 1.0)
    x_hat = jnp.where(active, x * (alpha_hat / alpha_safe) + extra * s_noise * z, x)
    return x_hat, t_hat, alpha_hat, sigma_hat


def _heun_step(run, carry, s):
    """EDM Algorithm 2 (Karras et al. 2022) in (sigmabar, xbar), mapped back to x.

    Churn, an Euler step, and where flagged the trapezoidal correction xbar' = xbar_hat + (sigmabar'
    - sigmahat) (d + d') / 2 (line 8).
    """
    (x,) = carry
    gamma_max = min(run.options["s_churn"] / run.num_steps, math.sqrt(2.0) - 1.0)
    if gamma_max > 0:
        x_hat, t_hat, alpha_hat, sigma_hat = _churn(run, x, s, gamma_max)
    else:
        x_hat, t_hat, alpha_hat, sigma_hat = x, s["t"], s["alpha"], s["sigma"]
    x0_hat = run.evaluate(x_hat, t_hat)
    eps_hat = _eps_hat(x_hat, x0_hat, alpha_hat, sigma_hat)
    x_next = s["alpha_next"] * x0_hat + s["sigma_next"] * eps_hat  # Euler step

    def correct(x_euler):
        x0_next = run.evaluate(x_euler, s["t_next"])
        eps_next = _eps_hat(x_euler, x0_next, s["alpha_next"], s["sigma_next"])
        step_size = s["sigma_next"] - s["alpha_next"] * sigma_hat / alpha_hat  # times alpha'
        return x_euler + 0.5 * step_size * (eps_next - eps_hat)

    return (jax.lax.cond(s["flag"], correct, lambda v: v, x_next),)


# --------------------------------------------------------------------------------------------
# The table.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Method:
    """One sampler, all the frame needs to know about it.

    name: what ``sample(method=...)`` takes.
    step: ``step(run, carry, s) -> carry``, one step of the grid; ``carry[0]`` is the state.
    summary: one line, with its paper.
    options: the option names and their defaults (numbers).
    checks: (predicate(options), message) pairs; the message is formatted with the options.
    is_stochastic: whether these options draw noise (and so need a key).
    step_flags: ``step_flags(start_finite, options)``, with ``start_finite[i]`` whether step i
        starts at a finite log-SNR: the per-step ``s["flag"]`` (leading axis: the N steps).
    evaluations: denoiser evaluations per sample, given the flags.
    init: ``init(x_init, options) -> carry`` before the first step.
    """

    name: str
    step: Callable[..., tuple]
    summary: str
    options: Mapping[str, float] = dataclasses.field(default_factory=dict)
    checks: tuple = ()
    is_stochastic: Callable[[dict], bool] = lambda options: False
    step_flags: Callable[[np.ndarray, dict], np.ndarray] = (
        lambda start_finite, options: np.zeros(len(start_finite), dtype=bool))
    evaluations: Callable[[np.ndarray], int] = len
    init: Callable[[jax.Array, dict], tuple] = lambda x, options: (x,)


METHODS_TABLE = {m.name: m for m in [
    Method("ddpm", _ddpm_step, "ancestral sampling of the DDPM posterior (Ho et al. 2020)",
           is_stochastic=lambda o: True),
    Method("ddim", _ddim_step, "DDIM (Song et al. 2021); eta = 0 is deterministic",
           {"eta": 0.0}, ((lambda o: 0.0 <= o["eta"] <= 1.0, "ddim eta must be in [0, 1], got "
                           "{eta}"),), is_stochastic=lambda o: o["eta"] > 0),
    Method("euler", _euler_step, "Euler on the probability-flow ODE (Karras et al. 2022, Alg. 1)"),
    Method("euler_ancestral", _euler_ancestral_step, "k-diffusion's Euler ancestral",
           {"eta": 1.0, "s_noise": 1.0},
           ((lambda o: o["eta"] >= 0, "euler_ancestral eta must be >= 0, got {eta}"),),
           is_stochastic=lambda o: o["eta"] > 0),
    Method("heun", _heun_step, "EDM's Algorithm 2, Heun with optional churn (Karras et al. 2022)",
           {"s_churn": 0.0, "s_min": 0.0, "s_max": float("inf"), "s_noise": 1.0},
           ((lambda o: o["s_churn"] >= 0, "heun s_churn must be >= 0, got {s_churn}"),
            (lambda o: o["s_min"] <= o["s_max"], "heun needs s_min <= s_max")),
           is_stochastic=lambda o: o["s_churn"] > 0,
           step_flags=lambda finite, o: finite & (np.arange(len(finite)) < len(finite) - 1),
           evaluations=lambda flags: len(flags) + int(np.sum(flags))),
    Method("dpmpp_2m", multistep.dpmpp_2m_step, "DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2)",
           step_flags=lambda finite, o: multistep.multistep_orders(finite, 2),
           init=lambda x, o: (x, jnp.zeros_like(x), jnp.ones((), x.dtype))),
    Method("dpmpp_3m", multistep.dpmpp_3m_step, "DPM-Solver++(3M), Lu et al.'s third-order multistep",
           {"d2_weight": 1.0}, ((lambda o: o["d2_weight"] in (1, 2),
                                 "dpmpp_3m d2_weight must be 1 or 2, got {d2_weight:g}"),),
           step_flags=multistep.dpmpp_3m_orders,
           init=lambda x, o: (x,) + (jnp.zeros_like(x),) * 2 + (jnp.ones((), x.dtype),) * 2),
    Method("unipc", multistep.unipc_step, "UniPC-p, B(h) = e^h - 1, data prediction (Zhao et al. 2023)",
           {"order": 2.0}, ((lambda o: o["order"] in (2, 3), "unipc order must be 2 or 3, got "
                             "{order:g}"),),
           step_flags=multistep.unipc_flags, init=multistep.unipc_init),
    Method("plms", multistep.plms_step, "PLMS, PNDM's pseudo linear multistep (Liu et al. 2022)",
           step_flags=multistep.plms_flags, evaluations=multistep.plms_evaluations,
           init=lambda x, o: (x,) + (jnp.zeros_like(x),) * 3),
]}
METHODS = tuple(METHODS_TABLE)


# --------------------------------------------------------------------------------------------
# The frame.
# --------------------------------------------------------------------------------------------


def _sample_impl(static: _Static, dynamic_denoise_fn, noise, key, grid_arrays, known):
    """The frame every method shares: the grid's coefficients, then one lax.scan of its step.

    The scan runs over "ops": the N steps of the grid in order, or, with resampling jumps, the
    steps interleaved with jumps back up the grid (``ops``: [from index, to index] per op)."""
    method, schedule = METHODS_TABLE[static.method], static.schedule
    options = dict(static.options)
    denoise_fn = static.denoise_fn or dynamic_denoise_fn
    # The state and the grid coefficients stay in at least float32 even for bfloat16 noise.
    dtype = jnp.promote_types(noise.dtype, jnp.float32)
    noise = noise.astype(dtype)
    times, flags, prior_scale, ops = grid_arrays
    num_steps = times.shape[0] - 1
    t, alpha, sigma, logsnr = _grid_coefficients(schedule, times, dtype)
    if prior_scale is None:
        prior_scale = jnp.sqrt(alpha[0] ** 2 + sigma[0] ** 2)
    x_init = noise * prior_scale.astype(dtype)
    batch = noise.shape[0]

    def evaluate(x, t_value):
        x0_hat = denoise_fn(x, jnp.full((batch,), t_value, dtype))
        if x0_hat.shape != x.shape:
            raise ValueError(
                f"denoise_fn returned shape {x0_hat.shape} for x_t of shape {x.shape}; it must "
                "return x0_hat shaped like x_t"
            )
        return x0_hat.astype(dtype)

    num_ops = ops.shape[0]
    keys = jax.random.split(key, num_ops) if key is not None else jnp.zeros((num_ops,))
    start, end = ops[:, 0], ops[:, 1]
    step_index = jnp.minimum(start, end)  # a jump's flag is never read
    per_step = {"flag": flags[step_index], "key": keys}
    for name, values in (("t", t), ("alpha", alpha), ("sigma", sigma), ("logsnr", logsnr)):
        per_step[name], per_step[name + "_next"] = values[start], values[end]
    if static.known is not None:
        last = end == num_steps  # the final step: the known region is x0 itself
        per_step["known_alpha"] = jnp.where(last, 1.0, per_step["alpha_next"]).astype(dtype)
        per_step["known_sigma"] = jnp.where(last, 0.0, per_step["sigma_next"]).astype(dtype)
    if static.jumps or static.known == "fresh":
        per_step["extra_key"] = jax.random.split(jax.random.fold_in(key, 1), num_ops)
    if static.jumps:
        per_step["jump"] = end < start
    run = _Run(evaluate, options, method.is_stochastic(options), num_steps, schedule, dtype)

    def step(carry, s):
        carry = method.step(run, carry, s)
        if static.known is None:
            return carry
        x0 = known.x0.astype(dtype)
        keep = known.keep.astype(dtype)
        z = (known.noise.astype(dtype) if static.known == "fixed"
             else jax.random.normal(s["extra_key"], x0.shape, dtype))
        x_known = s["known_alpha"] * x0 + s["known_sigma"] * z
        return (keep * x_known + (1 - keep) * carry[0],) + tuple(carry[1:])

    def body(carry, s):
        if static.jumps:
            carry = jax.lax.cond(
                s["jump"],
                lambda c: (renoise(c[0], s, jax.random.normal(
                    jax.random.fold_in(s["extra_key"], 1), c[0].shape, dtype)),),
                lambda c: step(c, s), carry)
        else:
            carry = step(carry, s)
        return carry, carry[0]

    final, path = jax.lax.scan(body, method.init(x_init, options), per_step)
    out_dtype = static.output_dtype
    trajectory = None
    if static.return_trajectory:
        trajectory = jnp.concatenate([x_init[None], path], axis=0).astype(out_dtype)
    return final[0].astype(out_dtype), trajectory


_sample_jit = jax.jit(_sample_impl, static_argnums=0)


def _method_and_options(method, options):
    """The record of ``method`` and its options merged over the defaults, checked."""
    if method not in METHODS_TABLE:
        raise ValueError(f"unknown sampler method {method!r}; choose one of {METHODS}")
    record = METHODS_TABLE[method]
    unknown = sorted(set(options) - set(record.options))
    if unknown:
        raise ValueError(
            f"sampler {method!r} got unknown option(s) {unknown}; it accepts "
            f"{sorted(record.options) if record.options else 'no options'}"
        )
    merged = {**record.options, **{k: float(v) for k, v in options.items()}}
    for predicate, message in record.checks:
        if not predicate(merged):
            raise ValueError(message.format(**merged))
    return record, merged


def _step_flags(record, options, times, schedule):
    with jax.ensure_compile_time_eval():
        logsnr = np.asarray(schedule.logsnr(jnp.asarray(times[:-1])), dtype=np.float64)
    return np.asarray(record.step_flags(np.isfinite(logsnr), options))


def _sample_times(schedule, num_steps, grid, time_grid, t_min, t_max, rho, snap, t_end):
    """The grid of :func:`sample`: ``time_grid`` or a named grid, then the final time."""
    times = _network_times(schedule, num_steps, grid, time_grid, t_min, t_max, rho, snap)
    if t_end is not None and t_end != 0:
        t_end = float(t_end)
        if not 0.0 < t_end < times[-2]:
            raise ValueError(
                f"t_end must lie between 0 and the last network time {times[-2]:g}, got {t_end:g}"
            )
        times[-1] = t_end
    return times


def _network_times(schedule, num_steps, grid, time_grid, t_min, t_max, rho, snap):
    """``time_grid`` with the final step appended, or a named grid."""
    if time_grid is None:
        if num_steps is None:
            raise ValueError("give num_steps (or an explicit time_grid)")
        return time_grids.time_grid(schedule, num_steps, grid, t_min=t_min, t_max=t_max, rho=rho,
                                     snap=snap)
    ignored = {"grid": grid != "uniform", "t_min": t_min is not None,
               "t_max": t_max is not None, "rho": rho != 7.0, "snap": snap is not None}
    if any(ignored.values()):
        raise ValueError(
            f"time_grid fixes the times; do not also pass {[k for k, v in ignored.items() if v]}"
        )
    times = time_grids.finish_grid(schedule, time_grid, "time_grid")
    if num_steps is not None and num_steps != len(times) - 1:
        raise ValueError(
            f"num_steps={num_steps} disagrees with the {len(times) - 1} steps of time_grid"
        )
    return times


def number_of_evaluations(method, times, schedule, **options) -> int:
    """Denoiser evaluations per sample for ``method`` (with ``options``) on the grid ``times``."""
    record, merged = _method_and_options(method, options)
    schedule = schedules_lib.get(schedule)
    return record.evaluations(_step_flags(record, merged, times, schedule))


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
    t_end: Optional[float] = None,
    prior_scale: Optional[float] = None,
    known: Optional[KnownRegion] = None,
    jump_length: int = 10,
    jump_n_sample: int = 1,
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
        (by sqrt(alpha(t_max)^2 + sigma(t_max)^2), or ``prior_scale``). The samples come back
        in its dtype; the sampler's own arithmetic runs in float32 at least (float64 when the
        noise is float64).
      schedule: a :class:`~diffusion_jax.schedules.Schedule` or a schedule name.
      method: one of :data:`METHODS`; its options are keyword arguments (names, defaults and
        papers: :data:`METHODS_TABLE` and ``docs/samplers.md``).
      num_steps: number of steps N (the final step to clean data included).
      key: PRNG key; required by stochastic settings.
      grid: one of :data:`GRIDS`, see :func:`time_grid`; ``t_min``, ``t_max``, ``rho`` and ``snap``
        are passed on to it.
      time_grid: the N network times (strictly decreasing, sigma > 0 at each), instead of
        ``grid``; the final step to clean data is appended.
      t_end: where the final step ends: None or 0 for clean data (sigma = 0), or a time between
        0 and the last network time, whose noisy state is then returned (diffusers' DDIM with
        ``set_alpha_to_one=False`` ends at alpha-bar_0, t_end = 1 / T). The last step is still
        the method's final step (first order for the multistep methods, no Heun correction).
      prior_scale: the first state is ``prior_scale * noise``; by default the schedule's
        sqrt(alpha(t_0)^2 + sigma(t_0)^2), the spread of data of unit variance noised to t_0.
        Image-to-image passes the forward-noised input as ``noise`` with ``prior_scale=1``
        (see :mod:`diffusion_jax.editing`).
      known: a :class:`KnownRegion` to keep (inpainting): after each step its forward-noised
        copy replaces the state where ``known.keep`` is 1, and after the last step ``known.x0``
        itself does.
      jump_length, jump_n_sample: RePaint's resampling (:func:`jump_schedule`): every
        ``jump_length`` steps the state is noised back that many steps and they are run again,
        ``jump_n_sample`` times in all (1: no resampling). Only for the methods that keep no
        history between steps (ddpm, ddim, euler, euler_ancestral, heun); needs ``key``.
      return_trajectory: also return every intermediate state (one per op: with resampling
        jumps, the jumps' states too).

    Returns:
      A :class:`SampleResult` (samples, nfe, times, trajectory).
    """
    schedule = schedules_lib.get(schedule)
    record, merged = _method_and_options(method, options)
    noise = jnp.asarray(noise)
    if noise.ndim < 1 or not jnp.issubdtype(noise.dtype, jnp.floating):
        raise ValueError(
            f"noise must be a floating-point array of shape [batch, ...], got {noise.dtype} "
            f"of shape {noise.shape}"
        )
    times = _sample_times(schedule, num_steps, grid, time_grid, t_min, t_max, rho, snap, t_end)
    ops = jump_schedule(len(times) - 1, jump_length, jump_n_sample)
    jumps = bool(np.any(ops[:, 1] < ops[:, 0]))
    if jumps and len(record.init(jnp.zeros(()), merged)) > 1:
        raise ValueError(
            f"resampling jumps (jump_n_sample={jump_n_sample}) need a sampler that keeps no "
            f"history between steps; {method!r} does. Use one of ddpm, ddim, euler, "
            "euler_ancestral, heun")
    known_mode = None
    if known is not None:
        known = check_known(known, noise)
        known_mode = "fresh" if known.noise is None else "fixed"
    needs_key = record.is_stochastic(merged) or jumps or known_mode == "fresh"
    if not needs_key:
        key = None
    elif key is None:
        why = (f"sampler {method!r} with options {merged} is stochastic"
               if record.is_stochastic(merged) else
               "resampling jumps draw noise" if jumps else
               "a known region without fixed noise draws fresh noise at each step")
        raise ValueError(f"{why}: pass key=")
    flags = _step_flags(record, merged, times, schedule)
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
        known=known_mode,
        jumps=jumps,
    )
    time_dtype = jnp.promote_types(noise.dtype, jnp.float32)
    scale = None if prior_scale is None else jnp.asarray(prior_scale, time_dtype)
    samples, trajectory = _sample_jit(
        static, dynamic_fn, noise, key,
        (jnp.asarray(times, time_dtype), jnp.asarray(flags), scale, jnp.asarray(ops)), known)
    steps = ops[ops[:, 1] > ops[:, 0], 0]
    return SampleResult(samples, record.evaluations(flags[steps]), times, trajectory)
