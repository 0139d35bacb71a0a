"""Time grids for the samplers: the N network times from t_max down, then the final clean state.

:func:`time_grid` and :data:`GRIDS` are also :func:`diffusion_jax.samplers.time_grid` and
:data:`diffusion_jax.samplers.GRIDS`; the samplers take a grid by name (``grid=``) or its times
(``time_grid=``, checked by :func:`finish_grid`).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import schedules as schedules_lib

__all__ = ["GRIDS", "time_grid", "finish_grid"]

GRIDS = ("uniform", "trailing", "logsnr", "karras")

# Where the schedule reaches zero SNR, the log-SNR and Karras grids space their points as if the
# first time had EDM's sigma_max = 80 (log-SNR -8.76); the first point itself stays at t_max, where
# the sampler starts from pure noise.
_GRID_LOGSNR_FLOOR = -2.0 * math.log(80.0)


def _eager(fn, t):
    with jax.ensure_compile_time_eval():
        return np.array(fn(jnp.asarray(t)), dtype=np.float64)


def time_grid(
    schedule,
    num_steps: int,
    grid: str = "uniform",
    *,
    t_min: Optional[float] = None,
    t_max: Optional[float] = None,
    rho: float = 7.0,
    snap: Optional[bool] = None,
) -> np.ndarray:
    """The N + 1 times a sampler visits on the named ``grid``.

    N network times from ``t_max`` down, then the final clean state, recorded as 0 (sigma = 0
    there by definition, whatever the schedule gives at t = 0).

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
    return finish_grid(schedule, times, f"the {grid!r} grid with {num_steps} steps")


def finish_grid(schedule, network_times, what):
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
