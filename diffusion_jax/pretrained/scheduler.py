"""Diffusers ``scheduler/scheduler_config.json`` -> this package's schedule and sampler.

:func:`read_scheduler_config` reads the file, :func:`plan_from_config` turns it into a
:class:`SamplerPlan`: the :class:`~diffusion_jax.schedules.DiscreteVP` of the config's betas, the
prediction target, and the sampler of :mod:`diffusion_jax.samplers` that reproduces the
scheduler's update rule. ``samplers.sample(denoise_fn, noise, **plan.sample_kwargs(N))`` then
samples as ``scheduler.set_timesteps(N)`` and its ``step`` would, with a network that is fed
diffusers' timestep ``k = T t - 1`` for our time ``t`` (alpha-bar at t = (k + 1) / T is diffusers'
``alphas_cumprod[k]``).

Scheduler classes, the sampler each becomes, and how it places its N timesteps
(:class:`DiffusersTimesteps`):

* DDIMScheduler -> ``ddim``; DDPMScheduler -> ``ddpm``; PNDMScheduler (``skip_prk_steps``) ->
  ``plms``. "stride": N timesteps, each step from k to k - T // N.
* EulerDiscreteScheduler -> ``euler``; EulerAncestralDiscreteScheduler -> ``euler_ancestral``;
  HeunDiscreteScheduler -> ``heun``. "sigma": N timesteps, sigmabar interpolated linearly.
* DPMSolverMultistepScheduler -> ``dpmpp_2m`` (``solver_order`` 1: ``ddim``, 3: ``dpmpp_3m``);
  UniPCMultistepScheduler -> ``unipc``. "multistep": the first N of N + 1 spaced timesteps.

Exact (same states and timesteps, to float64 round-off; ``tests/test_sd_scheduler.py``): every
class above with integer timesteps, which covers "leading" and "trailing" spacing, "linspace" for
the stride and multistep families, ``set_alpha_to_one`` False (the last step then ends at
alpha-bar_0, ``t_end = 1 / T``) and True, epsilon, v and sample prediction, and
``rescale_betas_zero_snr`` except where noted below. The stochastic ones (``ddpm``, ``ddim`` with
eta > 0, ``euler_ancestral``) agree given the same noise.

Where diffusers' own noise levels and timesteps disagree, the plan keeps diffusers' noise levels
(sigmas) exactly, so every update computes the same numbers, and the network is fed the time of
that noise level on our schedule:

* Karras sigmas (DPM-Solver, UniPC): diffusers rounds the timesteps it feeds the network but steps
  with the unrounded sigmas; ours feeds the unrounded ones (up to half a timestep apart).
* fractional timesteps (Euler, Euler ancestral and Heun with "linspace" spacing or Karras sigmas):
  diffusers interpolates sigmabar (or log-sigmabar) linearly between timesteps, our schedule
  log-alpha-bar, so the timesteps differ by a small fraction of a timestep.
* ``rescale_betas_zero_snr`` with a first timestep of T - 1 under DPM-Solver, UniPC and the Euler
  schedulers: diffusers replaces alpha-bar = 0 there by 2^-24; we start at that noise level, t
  slightly below 1 (for Stable Diffusion's betas the network sees timestep 998.45, not 999).

The stride family steps from k to k - T // N even where the next listed timestep is another one
("linspace", or "trailing" when N does not divide T); there our grid uses the listed timesteps for
states as well, which diffusers does not. Config values that change sampling in a way no sampler
here reproduces (thresholding, clipping, sigma schedules other than Karras', learned variances,
SDE variants, PNDM's Runge-Kutta warm-up, PNDM with v or sample prediction, whose raw outputs it
extrapolates) raise a ``ValueError`` naming the key; ``plan_from_config(config, method=...)`` then
picks one of our samplers instead. The schedule itself must be a ``DiscreteVP``: other beta
schedules, trained betas and flow-matching schedulers are refused whatever the method.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import samplers, schedules
from diffusion_jax.pretrained.weights import read_json_object

__all__ = ["CONFIG_NAME", "SamplerPlan", "DiffusersTimesteps", "plan_from_config",
           "read_scheduler_config", "SCHEDULER_CLASSES"]

CONFIG_NAME = "scheduler_config.json"
# alpha-bar that DPM-Solver, UniPC and the Euler schedulers put at the last training timestep
# instead of 0 under rescale_betas_zero_snr (float16's smallest subnormal).
_ZERO_SNR_STAND_IN = 2.0**-24
_ANY = None  # "any value is handled" in the tables below

# Keys every supported class reads, with diffusers' defaults (timestep_spacing's is per class).
_COMMON = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
           "beta_schedule": "linear", "trained_betas": None, "prediction_type": "epsilon",
           "steps_offset": 0}
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_SPACINGS = ("linspace", "leading", "trailing")
# Keys that only matter when a refused option is on (thresholding, clipping, flow sigmas).
_INERT = ("dynamic_thresholding_ratio", "sample_max_value", "clip_sample_range", "flow_shift",
          "time_shift_type")
_OFF = (False,)
_NONE = (None,)


@dataclasses.dataclass(frozen=True)
class _Class:
    """What this module knows of one diffusers scheduler class."""

    method: str
    family: str  # "stride", "sigma" or "multistep" (see DiffusersTimesteps)
    spacing: str  # its default timestep_spacing
    keys: Mapping[str, tuple]  # key -> (diffusers' default, accepted values or _ANY)
    zero_snr_stand_in: bool = False  # puts 2^-24 at the last timestep under zero SNR
    betas: tuple = (1e-4, 0.02)  # diffusers' default beta_start, beta_end
    predictions: tuple = tuple(_PREDICTIONS)  # the prediction types its update rule reproduces


_ZERO_SNR = {"rescale_betas_zero_snr": (False, _ANY)}
_SIGMA_SCHEDULES = {"use_karras_sigmas": (False, _ANY), "use_exponential_sigmas": (False, _OFF),
                    "use_beta_sigmas": (False, _OFF)}
_EXPONENTIAL_INTEGRATOR = {
    **_ZERO_SNR, **_SIGMA_SCHEDULES, "thresholding": (False, _OFF),
    "use_flow_sigmas": (False, _OFF), "final_sigmas_type": ("zero", ("zero",)),
    "use_dynamic_shifting": (False, _OFF), "lower_order_final": (True, _ANY),
    "solver_order": (2, _ANY), "solver_type": (_ANY, _ANY)}

SCHEDULER_CLASSES = {
    "DDIMScheduler": _Class("ddim", "stride", "leading", {
        **_ZERO_SNR, "clip_sample": (True, _OFF), "set_alpha_to_one": (True, _ANY),
        "thresholding": (False, _OFF)}),
    "DDPMScheduler": _Class("ddpm", "stride", "leading", {
        **_ZERO_SNR, "clip_sample": (True, _OFF), "thresholding": (False, _OFF),
        "variance_type": ("fixed_small", ("fixed_small", "fixed_small_log"))}),
    # PNDM extrapolates the network's raw outputs: only for epsilon is that our plms.
    "PNDMScheduler": _Class("plms", "stride", "leading", {
        "skip_prk_steps": (False, (True,)), "set_alpha_to_one": (False, _ANY)},
        predictions=("epsilon",)),
    "EulerDiscreteScheduler": _Class("euler", "sigma", "linspace", {
        **_ZERO_SNR, **_SIGMA_SCHEDULES, "interpolation_type": ("linear", ("linear",)),
        "sigma_min": (None, _NONE), "sigma_max": (None, _NONE),
        "timestep_type": ("discrete", _ANY), "final_sigmas_type": ("zero", ("zero",))},
        zero_snr_stand_in=True),
    "EulerAncestralDiscreteScheduler": _Class("euler_ancestral", "sigma", "linspace", _ZERO_SNR,
                                              zero_snr_stand_in=True),
    "HeunDiscreteScheduler": _Class("heun", "sigma", "linspace", {
        **_SIGMA_SCHEDULES, "clip_sample": (False, _OFF)}, betas=(0.00085, 0.012)),
    "DPMSolverMultistepScheduler": _Class("dpmpp_2m", "multistep", "linspace", {
        **_EXPONENTIAL_INTEGRATOR, "algorithm_type": ("dpmsolver++", ("dpmsolver++", "deis")),
        "euler_at_final": (False, _ANY), "use_lu_lambdas": (False, _OFF),
        "lambda_min_clipped": (-math.inf, _ANY), "variance_type": (None, _NONE)},
        zero_snr_stand_in=True),
    "UniPCMultistepScheduler": _Class("unipc", "multistep", "linspace", {
        **_EXPONENTIAL_INTEGRATOR, "predict_x0": (True, (True,)),
        "lower_order_final": (True, (True,)), "disable_corrector": ([], ([],)),
        "solver_p": (None, _NONE), "sigma_min": (None, _NONE), "sigma_max": (None, _NONE),
        "shift_terminal": (None, _NONE)}, zero_snr_stand_in=True),
}
# Keys some supported class reads: diffusers ignores them for a class that does not (SD 1.5's
# PNDM config carries clip_sample), and so does this module.
_KNOWN_KEYS = set(_COMMON) | {"timestep_spacing"} | set(_INERT) | {
    key for record in SCHEDULER_CLASSES.values() for key in record.keys}
# The refused keys that place the timesteps: refused whenever the plan uses the scheduler's
# timesteps, whichever sampler runs on them.
_GRID_KEYS = {"use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
              "interpolation_type", "sigma_min", "sigma_max", "use_dynamic_shifting"}
# Another class over DDPM betas, sampled with a method chosen by the caller: its schedule and
# the N timesteps of its timestep_spacing (Lin et al. 2023, Table 2).
_OTHER_BETAS_CLASS = _Class("ddim", "sigma", "linspace", _ZERO_SNR)
_BETA_KEYS = ("beta_start", "beta_end", "beta_schedule", "trained_betas")


def read_scheduler_config(folder) -> dict:
    """The dict in ``folder/scheduler_config.json`` (``folder``: a model's ``scheduler/`` folder).

    A model's root folder works too when it holds ``scheduler/scheduler_config.json``.
    """
    folder = os.fspath(folder)
    path = os.path.join(folder, CONFIG_NAME)
    nested = os.path.join(folder, "scheduler", CONFIG_NAME)
    if not os.path.isfile(path) and os.path.isfile(nested):
        path = nested
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no scheduler config at {path}: pass the model's scheduler/ folder, which holds "
            f"{CONFIG_NAME}")
    return read_json_object(path)


# --------------------------------------------------------------------------------------------
# Where a diffusers scheduler puts its timesteps and noise levels.
# --------------------------------------------------------------------------------------------


def _karras(sigma_max, sigma_min, num_steps, rho=7.0):
    """Karras et al. 2022, Eq. 5: sigma^(1/rho) evenly spaced from sigma_max to sigma_min."""
    ramp = np.linspace(0.0, 1.0, num_steps)
    hi, lo = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _eager_float64(fn, values):
    with jax.enable_x64(True), jax.ensure_compile_time_eval():
        return np.asarray(fn(jnp.asarray(values, jnp.float64)), dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class DiffusersTimesteps:
    """How a diffusers scheduler places its N timesteps in ``set_timesteps`` (Lin et al. 2023, Table 2).

    family: "stride" (DDIM, DDPM, PNDM: N timesteps; each step goes from k to k - T // N, the last
        to alpha-bar 1 or, with ``final_alpha_bar_one`` off, to alpha-bar_0), "sigma" (Euler,
        Euler ancestral, Heun: N timesteps, possibly fractional, their sigmabar interpolated
        linearly), "multistep" (DPM-Solver, UniPC: the first N of N + 1 spaced timesteps).
    spacing, steps_offset: diffusers' ``timestep_spacing`` and ``steps_offset`` (leading only).
    karras: Karras sigmas (``use_karras_sigmas``).
    final_alpha_bar_one: the stride family's ``set_alpha_to_one``.
    follows_listed: each step goes to the next listed timestep and the last to clean data
        (DDPMScheduler), instead of a stride of T // N (DDIM, PNDM).
    start_at_sigma_max: the first state is ``init_noise_sigma = sigmabar_0`` times the noise in
        xbar = x / alpha (Euler-type schedulers with linspace or trailing spacing), not unit noise.
    terminal_alpha_bar: alpha-bar the scheduler uses at the last training timestep in place of 0.
    last_timestep: DPM-Solver's ``lambda_min_clipped`` cut (the number of timesteps it keeps).
    """

    family: str
    spacing: str
    steps_offset: int = 0
    karras: bool = False
    final_alpha_bar_one: bool = True
    follows_listed: bool = False
    start_at_sigma_max: bool = False
    terminal_alpha_bar: Optional[float] = None
    last_timestep: Optional[int] = None

    def timesteps(self, num_steps: int, big_t: int) -> np.ndarray:
        """The scheduler's timesteps before any Karras conversion, float64, decreasing."""
        n = int(num_steps)
        if n < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        spacing, offset = self.spacing, self.steps_offset
        if self.family == "multistep":  # the first N of N + 1 points
            last = self.last_timestep or big_t
            if spacing == "linspace":
                k = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
            elif spacing == "leading":
                k = (np.arange(n + 1) * (last // (n + 1))).round()[::-1][:-1] + offset
            else:
                k = np.arange(last, 0, -big_t / n).round() - 1
        elif spacing == "linspace":
            k = np.linspace(0, big_t - 1, n)[::-1]
            k = k.round() if self.family == "stride" else k
        elif spacing == "leading":
            k = (np.arange(n) * (big_t // n))[::-1] + offset
        else:
            k = np.arange(big_t, 0, -big_t / n).round() - 1
        k = np.asarray(k, dtype=np.float64)
        if len(k) != n or k.min() < 0 or k.max() > big_t - 1 or np.any(np.diff(k) >= 0):
            raise ValueError(
                f"timestep_spacing={spacing!r} (steps_offset={offset}) gives the timesteps "
                f"{k.tolist()} for num_steps={n}, not {n} distinct ones in [0, {big_t - 1}] (as "
                "diffusers' set_timesteps computes them); choose another number of steps")
        return k

    def sigmas(self, schedule, num_steps):
        """(timesteps, sigmabar) of diffusers' scheduler: its N timesteps and noise levels."""
        big_t = schedule.num_timesteps
        table = _sigma_table(schedule, self.terminal_alpha_bar)
        k = self.timesteps(num_steps, big_t)
        sigmas = np.interp(k, np.arange(big_t), table)
        if self.karras:
            if self.family == "multistep":  # the whole table's range
                sigmas = _karras(table[-1], table[0], num_steps)
            else:  # the range of the spaced timesteps
                sigmas = _karras(sigmas[0], sigmas[-1], num_steps)
        return k, sigmas

    def grid(self, schedule, num_steps):
        """(network times, t_end, prior_scale) that reproduce the scheduler; see the module."""
        big_t = schedule.num_timesteps
        if self.family == "stride":
            k = self.timesteps(num_steps, big_t)
            if self.follows_listed:
                return (k + 1) / big_t, None, None
            after_last = k[-1] - big_t // int(num_steps)
            if after_last >= 0:
                t_end = (after_last + 1) / big_t
            else:
                t_end = None if self.final_alpha_bar_one else 1.0 / big_t
            return (k + 1) / big_t, t_end, None
        _, sigmas = self.sigmas(schedule, num_steps)
        times = _times_of_sigmas(schedule, sigmas, _sigma_table(schedule, None))
        prior_scale = None
        if self.start_at_sigma_max:  # x = sigmabar_0 noise / sqrt(1 + sigmabar_0^2)
            prior_scale = float(sigmas[0] / np.sqrt(1.0 + sigmas[0] ** 2))
        return times, None, prior_scale


def _sigma_table(schedule, terminal_alpha_bar):
    """sigmabar = sqrt((1 - alpha-bar) / alpha-bar) at diffusers' timesteps 0..T-1, float64."""
    log_alpha_bar = np.array(schedule.log_alpha_bar_table()[1:])
    if terminal_alpha_bar is not None and schedule.zero_terminal_snr:
        log_alpha_bar[-1] = math.log(terminal_alpha_bar)
    with np.errstate(over="ignore"):
        return np.sqrt(np.expm1(-log_alpha_bar))


def _times_of_sigmas(schedule, sigmas, table):
    """Our times of the noise levels ``sigmas``: (k + 1) / T where one is the table's at k."""
    times = _eager_float64(schedule.t_from_logsnr, -2.0 * np.log(sigmas))
    index = {value: k for k, value in enumerate(table)}
    on_table = [index.get(value) for value in sigmas]
    return np.array([(k + 1) / schedule.num_timesteps if k is not None else t
                     for k, t in zip(on_table, times)])


# --------------------------------------------------------------------------------------------
# The plan.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplerPlan:
    """A schedule, prediction target and sampler read from a diffusers scheduler config.

    scheduler_class: the config's ``_class_name``.
    schedule: the :class:`~diffusion_jax.schedules.DiscreteVP` of its betas.
    prediction: the network's target, a :mod:`diffusion_jax.parameterization` name.
    method, options: the sampler of :mod:`diffusion_jax.samplers` and its options.
    grid: one of :data:`diffusion_jax.samplers.GRIDS`, or None for the scheduler's timesteps.
    timesteps: how the scheduler places its timesteps (None with a named ``grid``).
    follows_scheduler: whether the plan also ends and starts as the scheduler does (``t_end``,
        ``prior_scale``); off when another method was chosen, which then ends at clean data.
    """

    scheduler_class: str
    schedule: schedules.DiscreteVP
    prediction: str
    method: str
    options: Mapping[str, float] = dataclasses.field(default_factory=dict)
    grid: Optional[str] = None
    timesteps: Optional[DiffusersTimesteps] = None
    follows_scheduler: bool = True

    def sample_kwargs(self, num_steps: int) -> dict:
        """Keyword arguments of :func:`diffusion_jax.samplers.sample` for ``num_steps`` steps.

        ``samplers.sample(denoise_fn, noise, **plan.sample_kwargs(N))`` with standard normal
        ``noise`` reproduces the scheduler after ``set_timesteps(N)`` (see the module docstring).
        """
        kwargs = {"schedule": self.schedule, "method": self.method, **self.options}
        if self.timesteps is None:
            return {**kwargs, "num_steps": int(num_steps), "grid": self.grid}
        times, t_end, prior_scale = self.timesteps.grid(self.schedule, num_steps)
        kwargs["time_grid"] = times
        if self.follows_scheduler and t_end is not None and t_end >= times[-1]:
            # diffusers lists timestep 0 last and also ends there (set_alpha_to_one=False with
            # linspace spacing): its states lag its timesteps by more than a stride, which no
            # time grid of ours reproduces.
            raise ValueError(
                f"{self.scheduler_class}'s last timestep (0) is also where it ends "
                f"(set_alpha_to_one=False with timestep_spacing={self.timesteps.spacing!r} at "
                f"{int(num_steps)} steps): diffusion_jax does not reproduce that; use 'leading' "
                "or 'trailing' spacing, or method= for one of its samplers")
        if self.follows_scheduler and t_end is not None:
            kwargs["t_end"] = t_end
        if self.follows_scheduler and prior_scale is not None:
            kwargs["prior_scale"] = prior_scale
        return kwargs

    def network_timesteps(self, num_steps: int) -> np.ndarray:
        """The diffusers timesteps ``k = T t - 1`` the sampler feeds the network, one per step.

        Heun's second evaluations reuse the next step's timestep, PLMS's extra one the second's.
        """
        kwargs = self.sample_kwargs(num_steps)
        if "time_grid" in kwargs:
            times = np.asarray(kwargs["time_grid"])
        else:
            times = samplers.time_grid(self.schedule, num_steps, self.grid)[:-1]
        return times * self.schedule.num_timesteps - 1.0


def _value(config, record, key):
    default = _COMMON.get(key, record.keys.get(key, (None,))[0])
    if key == "timestep_spacing":
        default = record.spacing
    elif key in ("beta_start", "beta_end"):
        default = record.betas[key == "beta_end"]
    return config.get(key, default)


def _refuse(class_name, key, value, why="", grid_key=False):
    alternative = ("plan_from_config(config, grid=...) can choose one of diffusion_jax's time "
                   f"grids {list(samplers.GRIDS)} instead" if grid_key else
                   "plan_from_config(config, method=...) can choose one of diffusion_jax's "
                   f"samplers {list(samplers.METHODS)} instead")
    raise ValueError(f"scheduler config {key}={value!r} ({class_name}) is not supported{why}; "
                     + alternative)


def _check_keys(config, class_name, record, *, update_rule, timesteps):
    """Refuse unknown keys, and values that neither the sampler nor the grid reproduce.

    ``update_rule``: the plan follows the scheduler's steps; ``timesteps``: its timesteps."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _KNOWN_KEYS)
    # Only the scheduler's own update rule could depend on a key we do not know; with another
    # sampler chosen, its betas and prediction type are all that is read.
    if unknown and record is not _OTHER_BETAS_CLASS and update_rule:
        raise ValueError(f"scheduler config keys {unknown} ({class_name}) are not known to "
                         "diffusion_jax; remove them if they do not change sampling")
    if timesteps and _value(config, record, "timestep_spacing") not in _SPACINGS:
        _refuse(class_name, "timestep_spacing", config["timestep_spacing"],
                f" (only {list(_SPACINGS)})", grid_key=True)
    for key, (_, accepted) in record.keys.items():
        value = _value(config, record, key)
        checked = update_rule or (timesteps and key in _GRID_KEYS)
        if checked and accepted is not _ANY and value not in accepted:
            _refuse(class_name, key, value, f" (only {list(accepted)})", key in _GRID_KEYS)
    prediction_type = _value(config, record, "prediction_type")
    if update_rule and prediction_type in _PREDICTIONS and prediction_type not in (
            record.predictions):
        _refuse(class_name, "prediction_type", prediction_type,
                f" (its update extrapolates the network's outputs, which only for "
                f"{list(record.predictions)} are the noise estimates our sampler extrapolates)")
    if update_rule and class_name == "EulerDiscreteScheduler" and (
            _value(config, record, "timestep_type") != "discrete"
            and _value(config, record, "prediction_type") == "v_prediction"):
        _refuse(class_name, "timestep_type", config["timestep_type"],
                " with v_prediction (the network is fed log-sigma / 4 there)")


def _method_and_options(config, class_name, record):
    """The folder's scheduler as one of our samplers."""
    if record.family != "multistep":
        return record.method, {"eta": 0.0} if record.method == "ddim" else {}
    order = _value(config, record, "solver_order")
    solver_type = _value(config, record, "solver_type")
    if class_name == "UniPCMultistepScheduler":
        if order not in (2, 3):
            _refuse(class_name, "solver_order", order, " (only 2 and 3)")
        if solver_type not in (_ANY, "bh2", "midpoint", "heun", "logrho"):  # diffusers: bh2
            _refuse(class_name, "solver_type", solver_type, " (only 'bh2')")
        return "unipc", {"order": float(order)}
    if order not in (1, 2, 3):
        _refuse(class_name, "solver_order", order, " (only 1, 2 and 3)")
    if solver_type not in (_ANY, "midpoint", "logrho", "bh1", "bh2") and order > 1:
        _refuse(class_name, "solver_type", solver_type, " (only 'midpoint')")
    if order == 3 and not _value(config, record, "lower_order_final"):
        _refuse(class_name, "lower_order_final", False, " with solver_order=3")
    return {1: "ddim", 2: "dpmpp_2m", 3: "dpmpp_3m"}[order], {1: {"eta": 0.0}, 2: {},
                                                             3: {"d2_weight": 1.0}}[order]


def _schedule(config, class_name, record):
    """The DiscreteVP of the config's betas; refuses the ones it cannot represent exactly."""
    trained = _value(config, record, "trained_betas")
    if trained is not None:
        raise ValueError(f"scheduler config trained_betas ({class_name}) is not supported: "
                         "diffusion_jax builds DiscreteVP schedules from beta_start, beta_end and "
                         "beta_schedule only")
    name = _value(config, record, "beta_schedule")
    if name not in ("linear", "scaled_linear"):
        raise ValueError(f"scheduler config beta_schedule={name!r} ({class_name}) is not "
                         "supported: diffusion_jax represents 'linear' and 'scaled_linear' exactly "
                         "and no other (whatever the sampler)")
    zero_snr = bool("rescale_betas_zero_snr" in record.keys
                    and _value(config, record, "rescale_betas_zero_snr"))
    return schedules.get("ddpm_linear" if name == "linear" else "scaled_linear",
                         beta_start=float(_value(config, record, "beta_start")),
                         beta_end=float(_value(config, record, "beta_end")),
                         num_timesteps=int(_value(config, record, "num_train_timesteps")),
                         zero_terminal_snr=zero_snr)


def _last_timestep(config, record, schedule):
    """DPM-Solver's lambda_min_clipped: how many timesteps have lambda = logSNR / 2 above it."""
    if "lambda_min_clipped" not in record.keys:
        return None
    clip = float(_value(config, record, "lambda_min_clipped"))
    table = _sigma_table(schedule, _ZERO_SNR_STAND_IN)
    clipped = int(np.sum(-np.log(table) < clip))
    return schedule.num_timesteps - clipped if clipped else None


def _timesteps(config, class_name, record, schedule):
    spacing = _value(config, record, "timestep_spacing")
    return DiffusersTimesteps(
        family=record.family, spacing=spacing,
        steps_offset=int(_value(config, record, "steps_offset")),
        karras=bool(record.keys.get("use_karras_sigmas")
                    and _value(config, record, "use_karras_sigmas")),
        final_alpha_bar_one=bool(_value(config, record, "set_alpha_to_one")
                                 if "set_alpha_to_one" in record.keys else True),
        follows_listed=class_name == "DDPMScheduler",
        start_at_sigma_max=record.family == "sigma" and spacing != "leading",
        terminal_alpha_bar=_ZERO_SNR_STAND_IN if record.zero_snr_stand_in else None,
        last_timestep=_last_timestep(config, record, schedule))


def _record(config, class_name, method):
    """The class's record; another class over DDPM betas only with a method chosen."""
    if class_name in SCHEDULER_CLASSES:
        return SCHEDULER_CLASSES[class_name]
    supported = (f"scheduler config _class_name={class_name!r} is not supported: diffusion_jax "
                 f"reproduces {sorted(SCHEDULER_CLASSES)}")
    if not any(key in config for key in _BETA_KEYS):
        raise ValueError(f"{supported}, and this config has none of {list(_BETA_KEYS)}: its "
                         "noise schedule is not one of DDPM betas, the only kind read here")
    if method is None:
        raise ValueError(f"{supported}; plan_from_config(config, method=...) samples its betas "
                         f"schedule with one of diffusion_jax's samplers {list(samplers.METHODS)}")
    return _OTHER_BETAS_CLASS


def plan_from_config(config: Mapping[str, Any], *, method: Optional[str] = None,
                     grid: Optional[str] = None) -> SamplerPlan:
    """The :class:`SamplerPlan` of a diffusers scheduler config (see :func:`read_scheduler_config`).

    method: None for the config's scheduler (see the module docstring), or one of
        :data:`diffusion_jax.samplers.METHODS` (with its default options) on the config's schedule
        and prediction target; that plan ends at clean data and starts from unit noise.
    grid: None for the scheduler's timesteps (its ``timestep_spacing``, ``steps_offset`` and
        Karras sigmas), or one of :data:`diffusion_jax.samplers.GRIDS`.
    Values that change sampling in a way the chosen sampler does not reproduce raise a
    ``ValueError`` naming the key; unknown keys too.
    """
    if method is not None and method not in samplers.METHODS:
        raise ValueError(f"unknown sampler method {method!r}; choose one of {samplers.METHODS}")
    if grid is not None and grid not in samplers.GRIDS:
        raise ValueError(f"unknown time grid {grid!r}; choose one of {samplers.GRIDS}")
    class_name = config.get("_class_name")
    record = _record(config, class_name, method)
    _check_keys(config, class_name, record, update_rule=method is None, timesteps=grid is None)
    schedule = _schedule(config, class_name, record)
    prediction_type = _value(config, record, "prediction_type")
    if prediction_type not in _PREDICTIONS:
        raise ValueError(f"scheduler config prediction_type={prediction_type!r} ({class_name}) "
                         f"is not supported; only {sorted(_PREDICTIONS)}")
    prediction = _PREDICTIONS[prediction_type]
    if prediction == "eps" and schedule.zero_terminal_snr:
        raise ValueError(f"scheduler config rescale_betas_zero_snr=True with prediction_type="
                         f"'epsilon' ({class_name}): a noise prediction cannot give x0 where "
                         "alpha-bar = 0; zero-terminal-SNR models predict 'v_prediction'")
    if method is None:
        chosen, options = _method_and_options(config, class_name, record)
    else:
        chosen, options = method, {}
    timesteps = None if grid is not None else _timesteps(config, class_name, record, schedule)
    return SamplerPlan(scheduler_class=class_name, schedule=schedule, prediction=prediction,
                       method=chosen, options=options, grid=grid, timesteps=timesteps,
                       follows_scheduler=method is None)
