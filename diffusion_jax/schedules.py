"""The forward process: noise schedules in continuous time.

A schedule describes how clean data is noised, ``x_t = alpha(t) * x0 + sigma(t) * eps`` with
``eps ~ N(0, I)`` and ``t`` in [0, 1] (t = 0 is clean or nearly clean data, t = 1 is the noisiest
level). Every schedule exposes the same four functions

* ``alpha(t)``, ``sigma(t)``: the signal and noise scales;
* ``logsnr(t) = log(alpha^2 / sigma^2)``: strictly decreasing in t;
* ``t_from_logsnr(logsnr)``: the inverse of ``logsnr``,

written so that they stay finite (or return exactly +-inf for the log-SNR) at both ends of [0, 1],
including schedules whose terminal SNR is zero.

Besides the functions, a schedule carries ``t_min`` and ``t_max``: the smallest and largest times a
sampler visits with the network before its final step to clean data (``sigma = 0``). Discrete-time
schedules (DDPM's 1000 betas) also carry ``num_timesteps`` so that samplers can snap their time grid
onto the times the network was trained at.

Schedules are frozen dataclasses of plain numbers: hashable, usable as static arguments of
``jax.jit``, and built from a name and config parameters with :func:`get`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Schedule",
    "DiscreteVP",
    "Cosine",
    "ShiftedCosine",
    "Sigmoid",
    "VarianceExploding",
    "EDM",
    "RectifiedFlow",
    "SCHEDULES",
    "get",
]


def _as_float(t):
    """Times as an array of at least float32 (bfloat16 cannot resolve t near 0 or 1)."""
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        return t.astype(jnp.result_type(float))
    return t.astype(jnp.promote_types(t.dtype, jnp.float32))


class Schedule:
    """Interface shared by all schedules. Subclasses define ``logsnr`` and ``t_from_logsnr``.

    The default ``alpha`` / ``sigma`` assume a variance-preserving process
    (alpha^2 + sigma^2 = 1) and derive both from the log-SNR in a way that is exact at +-inf.
    """

    name: str = "schedule"
    t_min: float = 0.0
    t_max: float = 1.0
    num_timesteps: Optional[int] = None

    def logsnr(self, t):
        raise NotImplementedError

    def t_from_logsnr(self, logsnr):
        raise NotImplementedError

    def alpha(self, t):
        # alpha^2 = sigmoid(logsnr) for variance-preserving schedules.
        return jnp.sqrt(jax.nn.sigmoid(self.logsnr(t)))

    def sigma(self, t):
        return jnp.sqrt(jax.nn.sigmoid(-self.logsnr(t)))

    def alpha_sigma(self, t):
        """(alpha(t), sigma(t)) in one call."""
        return self.alpha(t), self.sigma(t)


# --------------------------------------------------------------------------------------------
# Discrete-time DDPM tables mapped exactly onto t = i / T.
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _discrete_log_alpha_bar(beta_start, beta_end, num_timesteps, beta_schedule, zero_terminal_snr):
    """log(alpha-bar_i) for i = 0..T in float64, with alpha-bar_0 = 1 (clean data).

    Entry i (i >= 1) is the alpha-bar of DDPM's i-th step (Ho et al. 2020), which diffusers stores
    at index i - 1 and calls timestep i - 1. With ``zero_terminal_snr`` the last entry is -inf.
    """
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    elif beta_schedule == "scaled_linear":
        # Stable Diffusion: linear in sqrt(beta).
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2
    else:  # pragma: no cover - guarded by the dataclass
        raise ValueError(beta_schedule)
    log_alpha_bar = np.cumsum(np.log1p(-betas))
    if zero_terminal_snr:
        # Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha-bar) so that the last entry is
        # exactly zero while the first step keeps its value.
        sqrt_ab = np.exp(0.5 * log_alpha_bar)
        first, last = sqrt_ab[0], sqrt_ab[-1]
        sqrt_ab = (sqrt_ab - last) * first / (first - last)
        with np.errstate(divide="ignore"):
            log_alpha_bar = 2.0 * np.log(sqrt_ab)
        log_alpha_bar[-1] = -np.inf
    table = np.concatenate([[0.0], log_alpha_bar])
    table.setflags(write=False)
    return table


@dataclasses.dataclass(frozen=True)
class DiscreteVP(Schedule):
    """DDPM's discrete beta schedule on continuous time.

    alpha-bar at t = i / T equals DDPM's alpha-bar_i exactly (alpha-bar_0 = 1). Between grid points
    log(alpha-bar) is interpolated linearly, which keeps alpha^2 + sigma^2 = 1 and makes
    ``t_from_logsnr`` the exact inverse. With ``zero_terminal_snr`` (Lin et al. 2023) the last
    interval interpolates sqrt(alpha-bar) linearly down to exactly zero instead.

    ``beta_schedule='linear'`` is DDPM (Ho et al. 2020, betas 1e-4..0.02);
    ``'scaled_linear'`` is Stable Diffusion's (linear in sqrt(beta), 0.00085..0.012).
    """

    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_timesteps: int = 1000
    beta_schedule: str = "linear"
    zero_terminal_snr: bool = False
    name: str = "ddpm_linear"

    def __post_init__(self):
        if self.beta_schedule not in ("linear", "scaled_linear"):
            raise ValueError(
                f"beta_schedule must be 'linear' or 'scaled_linear', got {self.beta_schedule!r}"
            )
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(
                f"need 0 < beta_start < beta_end < 1, got beta_start={self.beta_start}, "
                f"beta_end={self.beta_end}"
            )
        if int(self.num_timesteps) != self.num_timesteps or self.num_timesteps < 2:
            raise ValueError(f"num_timesteps must be an integer >= 2, got {self.num_timesteps}")

    @property
    def t_min(self):
        return 1.0 / self.num_timesteps

    # The table and its derived quantities, in float64 numpy (converted per call).
    def log_alpha_bar_table(self):
        """log(alpha-bar_i) for i = 0..T (entry 0 is 0; the last is -inf with zero terminal SNR)."""
        return _discrete_log_alpha_bar(
            float(self.beta_start),
            float(self.beta_end),
            int(self.num_timesteps),
            self.beta_schedule,
            bool(self.zero_terminal_snr),
        )

    def alpha_bar_table(self):
        """alpha-bar_i for i = 0..T (entry 0 is 1)."""
        return np.exp(self.log_alpha_bar_table())

    def _finite_log_table(self):
        table = np.array(self.log_alpha_bar_table())
        if self.zero_terminal_snr:
            # The last interval is handled separately; keep the interpolation table finite.
            table[-1] = table[-2]
        return table

    def _sqrt_alpha_bar_before_last(self):
        return float(np.exp(0.5 * self.log_alpha_bar_table()[-2]))

    def _log_alpha_bar(self, t):
        t = _as_float(t)
        dtype = t.dtype
        big_t = self.num_timesteps
        # Linear interpolation on the uniform grid i / T by index arithmetic: jnp.interp would
        # search the grid instead, a loop of small kernels on every call (every training step).
        table = jnp.asarray(self._finite_log_table(), dtype)
        # (Clamped with where, not clip: clip would halve the slope at exactly t = 0 and 1.)
        position = jnp.where(t > 1.0, 1.0, jnp.where(t < 0.0, 0.0, t)) * big_t
        index = jnp.clip(jnp.floor(position), 0, big_t - 1)
        weight = position - index
        index = index.astype(jnp.int32)
        log_ab = table[index] + weight * (table[index + 1] - table[index])
        if self.zero_terminal_snr:
            # sqrt(alpha-bar) linear from its value at (T-1)/T to 0 at t = 1.
            a_prev = self._sqrt_alpha_bar_before_last()
            frac = jnp.clip((1.0 - t) * big_t, 0.0, 1.0)
            last = 2.0 * (jnp.log(frac) + jnp.log(jnp.asarray(a_prev, dtype)))
            log_ab = jnp.where(t > (big_t - 1) / big_t, last, log_ab)
        return log_ab

    def logsnr(self, t):
        log_ab = self._log_alpha_bar(t)
        return log_ab - jnp.log(-jnp.expm1(log_ab))

    def alpha(self, t):
        return jnp.exp(0.5 * self._log_alpha_bar(t))

    def sigma(self, t):
        return jnp.sqrt(-jnp.expm1(self._log_alpha_bar(t)))

    def t_from_logsnr(self, logsnr):
        logsnr = _as_float(logsnr)
        dtype = logsnr.dtype
        big_t = self.num_timesteps
        log_ab = jax.nn.log_sigmoid(logsnr)
        table = jnp.asarray(self._finite_log_table(), dtype)
        grid = jnp.linspace(0.0, 1.0, big_t + 1, dtype=dtype)
        # log alpha-bar decreases in t; interp needs increasing abscissae.
        t = jnp.interp(log_ab, table[::-1], grid[::-1])
        if self.zero_terminal_snr:
            a_prev = jnp.asarray(self._sqrt_alpha_bar_before_last(), dtype)
            sqrt_ab = jnp.exp(0.5 * log_ab)
            t_last = 1.0 - (sqrt_ab / a_prev) / big_t
            t = jnp.where(sqrt_ab < a_prev, t_last, t)
        return t


# --------------------------------------------------------------------------------------------
# Continuous variance-preserving schedules.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cosine(Schedule):
    """Cosine schedule (Nichol & Dhariwal 2021, Eq. 17).

    alpha-bar(t) = f(t) / f(0), f(t) = cos^2(pi/2 * (t + s) / (1 + s)).

    alpha-bar(1) is exactly 0 (zero terminal SNR). Written with sines of differences so that sigma
    is accurate near t = 0 and alpha near t = 1.
    """

    s: float = 0.008
    t_min: float = 1e-3
    t_max: float = 1.0
    name: str = "cosine"

    def __post_init__(self):
        if not self.s >= 0:
            raise ValueError(f"cosine offset s must be >= 0, got {self.s}")

    def _angles(self, t):
        t = _as_float(t)
        scale = math.pi / 2 / (1.0 + self.s)
        u = (t + self.s) * scale  # angle at t
        u0 = self.s * scale  # angle at t = 0
        cos_u = jnp.sin((1.0 - t) * scale)  # cos(pi/2 - (1-t)*scale) = cos(u), exact at t = 1
        return u, u0, cos_u

    def alpha(self, t):
        _, u0, cos_u = self._angles(t)
        return jnp.maximum(cos_u, 0.0) / math.cos(u0)

    def _sigma_sq_unnormalised(self, t):
        # cos^2(u0) - cos^2(u) = sin(u - u0) sin(u + u0), with u - u0 = t * scale exactly.
        u, u0, _ = self._angles(t)
        scale = math.pi / 2 / (1.0 + self.s)
        return jnp.maximum(jnp.sin(_as_float(t) * scale) * jnp.sin(u + u0), 0.0)

    def sigma(self, t):
        _, u0, _ = self._angles(t)
        return jnp.sqrt(self._sigma_sq_unnormalised(t)) / math.cos(u0)

    def logsnr(self, t):
        _, _, cos_u = self._angles(t)
        return 2.0 * jnp.log(jnp.maximum(cos_u, 0.0)) - jnp.log(self._sigma_sq_unnormalised(t))

    def t_from_logsnr(self, logsnr):
        logsnr = _as_float(logsnr)
        # alpha-bar = sigmoid(logsnr) = cos^2(u) / cos^2(u0)  =>  u = arccos(sqrt(ab) * cos(u0)).
        scale = math.pi / 2 / (1.0 + self.s)
        cos_u = jnp.sqrt(jax.nn.sigmoid(logsnr)) * math.cos(self.s * scale)
        t = jnp.arccos(jnp.clip(cos_u, 0.0, 1.0)) / scale - self.s
        return jnp.clip(t, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class ShiftedCosine(Schedule):
    """Cosine log-SNR shifted for resolution (Hoogeboom et al. 2023, "simple diffusion", Eq. 4).

    logSNR(t) = -2 log tan(pi t / 2) + 2 log(base_resolution / resolution).

    With ``resolution == base_resolution`` this is the s = 0 cosine schedule. Higher resolutions get
    a lower SNR at every t (more noise), which keeps global structure from being decided too early.
    """

    resolution: int = 64
    base_resolution: int = 64
    t_min: float = 1e-3
    t_max: float = 1.0
    name: str = "shifted_cosine"

    def __post_init__(self):
        if self.resolution <= 0 or self.base_resolution <= 0:
            raise ValueError(
                "resolution and base_resolution must be positive, got "
                f"{self.resolution} and {self.base_resolution}"
            )

    @property
    def shift(self):
        return 2.0 * math.log(self.base_resolution / self.resolution)

    def logsnr(self, t):
        t = _as_float(t)
        # -2 log tan(pi t / 2) = 2 log cos - 2 log sin; cos written as sin(pi (1 - t) / 2) so that
        # both ends give exact infinities.
        cos = jnp.sin(math.pi / 2 * (1.0 - t))
        sin = jnp.sin(math.pi / 2 * t)
        return 2.0 * (jnp.log(cos) - jnp.log(sin)) + self.shift

    def alpha(self, t):
        return jnp.sqrt(jax.nn.sigmoid(self.logsnr(t)))

    def t_from_logsnr(self, logsnr):
        logsnr = _as_float(logsnr)
        # tan(pi t / 2) = exp(-(logsnr - shift) / 2)
        return jnp.arctan(jnp.exp(-(logsnr - self.shift) / 2.0)) * (2.0 / math.pi)


@dataclasses.dataclass(frozen=True)
class Sigmoid(Schedule):
    """Sigmoid schedule (Jabri et al. 2022; Chen 2023, "On the importance of noise scheduling").

    alpha-bar(t) = (v_end - g(t)) / (v_end - v_start), with
    g(t) = sigmoid((start + t (end - start)) / tau), v_start = sigmoid(start / tau) and
    v_end = sigmoid(end / tau). alpha-bar(0) = 1, alpha-bar(1) = 0.
    """

    start: float = -3.0
    end: float = 3.0
    tau: float = 1.0
    t_min: float = 1e-3
    t_max: float = 1.0
    name: str = "sigmoid"

    def __post_init__(self):
        if not self.start < self.end:
            raise ValueError(f"sigmoid schedule needs start < end, got {self.start} >= {self.end}")
        if not self.tau > 0:
            raise ValueError(f"sigmoid schedule needs tau > 0, got {self.tau}")

    def _parts(self, t):
        """The differences (v_end - g(t), g(t) - v_start, v_end - v_start), free of cancellation.

        Each is a difference of two sigmoids written as
        sigmoid(b) - sigmoid(a) = sinh((b - a)/2) / (2 cosh(a/2) cosh(b/2)) with b - a formed
        exactly, so that neither end loses precision to cancellation."""
        t = _as_float(t)
        lo, hi = self.start / self.tau, self.end / self.tau
        mid = (self.start + t * (self.end - self.start)) / self.tau

        def difference(b, a, half_gap):
            return jnp.sinh(half_gap) / (2.0 * jnp.cosh(a / 2.0) * jnp.cosh(b / 2.0))

        span = (self.end - self.start) / self.tau
        alpha_num = difference(hi, mid, 0.5 * span * (1.0 - t))
        sigma_num = difference(mid, lo, 0.5 * span * t)
        total = math.sinh(0.5 * span) / (2.0 * math.cosh(lo / 2.0) * math.cosh(hi / 2.0))
        return alpha_num, sigma_num, total

    def alpha(self, t):
        num, _, den = self._parts(t)
        return jnp.sqrt(num / den)

    def sigma(self, t):
        _, num, den = self._parts(t)
        return jnp.sqrt(num / den)

    def logsnr(self, t):
        a_num, s_num, _ = self._parts(t)
        return jnp.log(a_num) - jnp.log(s_num)

    def t_from_logsnr(self, logsnr):
        logsnr = _as_float(logsnr)
        v_start = jax.nn.sigmoid(jnp.asarray(self.start / self.tau, logsnr.dtype))
        v_end = jax.nn.sigmoid(jnp.asarray(self.end / self.tau, logsnr.dtype))
        g = jax.nn.sigmoid(-logsnr) * v_end + jax.nn.sigmoid(logsnr) * v_start
        t = (self.tau * jnp.log(g / (1.0 - g)) - self.start) / (self.end - self.start)
        return jnp.clip(t, 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# alpha = 1 schedules and rectified flow.
# --------------------------------------------------------------------------------------------


class _AlphaOne(Schedule):
    """Shared code for schedules with alpha(t) = 1 and a given sigma(t)."""

    def alpha(self, t):
        return jnp.ones_like(_as_float(t))

    def logsnr(self, t):
        return -2.0 * jnp.log(self.sigma(t))

    def sigma_from_logsnr(self, logsnr):
        return jnp.exp(-0.5 * _as_float(logsnr))

    def _check_sigma_range(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max, got {self.sigma_min} and {self.sigma_max}"
            )


@dataclasses.dataclass(frozen=True)
class VarianceExploding(_AlphaOne):
    """Variance-exploding SDE (Song et al. 2021, Eq. 30): alpha = 1, sigma geometric in t.

    sigma(t) = sigma_min (sigma_max/sigma_min)^t. As in the paper t = 0 carries the small noise
    sigma_min; samplers end with a step to sigma = 0.
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_min: float = 0.0
    t_max: float = 1.0
    name: str = "ve"

    def __post_init__(self):
        self._check_sigma_range()

    def sigma(self, t):
        t = _as_float(t)
        return self.sigma_min * jnp.exp(t * math.log(self.sigma_max / self.sigma_min))

    def t_from_logsnr(self, logsnr):
        log_sigma = -0.5 * _as_float(logsnr)
        return jnp.clip(
            (log_sigma - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min),
            0.0,
            1.0,
        )


@dataclasses.dataclass(frozen=True)
class EDM(_AlphaOne):
    """EDM schedule (Karras et al. 2022): alpha = 1 and sigma^(1/rho) linear in t.

    sigma(t) = (sigma_min^(1/rho) + t (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho (Eq. 5 read
    backwards), so a uniform grid in t is exactly the paper's time discretisation. EDM's
    preconditioning and its sigma_data belong to the prediction target
    (``parameterization.get("edm", sigma_data=0.5)``), not to the schedule.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    t_min: float = 0.0
    t_max: float = 1.0
    name: str = "edm"

    def __post_init__(self):
        self._check_sigma_range()
        if not self.rho > 0:
            raise ValueError(f"rho must be > 0, got {self.rho}")

    def sigma(self, t):
        t = _as_float(t)
        lo = self.sigma_min ** (1.0 / self.rho)
        hi = self.sigma_max ** (1.0 / self.rho)
        return (lo + t * (hi - lo)) ** self.rho

    def t_from_logsnr(self, logsnr):
        sigma = self.sigma_from_logsnr(logsnr)
        lo = self.sigma_min ** (1.0 / self.rho)
        hi = self.sigma_max ** (1.0 / self.rho)
        return jnp.clip((sigma ** (1.0 / self.rho) - lo) / (hi - lo), 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class RectifiedFlow(Schedule):
    """Rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2022).

    alpha = 1 - t, sigma = t. ``shift`` applies Stable Diffusion 3's resolution shift (Esser et al.
    2024, Eq. 23), t -> shift * t / (1 + (shift - 1) t), which spends more time at high noise for
    shift > 1.
    """

    shift: float = 1.0
    t_min: float = 1e-3
    t_max: float = 1.0
    name: str = "rectified_flow"

    def __post_init__(self):
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")

    def alpha(self, t):
        # 1 - shift t / (1 + (shift - 1) t), written without the cancellation near t = 1.
        t = _as_float(t)
        return (1.0 - t) / (1.0 + (self.shift - 1.0) * t)

    def sigma(self, t):
        t = _as_float(t)
        return self.shift * t / (1.0 + (self.shift - 1.0) * t)

    def logsnr(self, t):
        t = _as_float(t)
        return 2.0 * (jnp.log1p(-t) - jnp.log(t) - math.log(self.shift))

    def t_from_logsnr(self, logsnr):
        s = jax.nn.sigmoid(-0.5 * _as_float(logsnr))
        if self.shift == 1.0:
            return s
        return s / (self.shift - (self.shift - 1.0) * s)


# --------------------------------------------------------------------------------------------
# Lookup by name.
# --------------------------------------------------------------------------------------------


def _ddpm_linear(**params):
    params.setdefault("beta_start", 1e-4)
    params.setdefault("beta_end", 0.02)
    return DiscreteVP(beta_schedule="linear", name="ddpm_linear", **params)


def _scaled_linear(**params):
    params.setdefault("beta_start", 0.00085)
    params.setdefault("beta_end", 0.012)
    return DiscreteVP(beta_schedule="scaled_linear", name="scaled_linear", **params)


SCHEDULES = {
    "ddpm_linear": _ddpm_linear,
    "scaled_linear": _scaled_linear,
    "cosine": Cosine,
    "shifted_cosine": ShiftedCosine,
    "sigmoid": Sigmoid,
    "ve": VarianceExploding,
    "edm": EDM,
    "rectified_flow": RectifiedFlow,
}

_PARAMS = {
    "ddpm_linear": ("beta_start", "beta_end", "num_timesteps", "zero_terminal_snr"),
    "scaled_linear": ("beta_start", "beta_end", "num_timesteps", "zero_terminal_snr"),
}


def _valid_params(name):
    if name in _PARAMS:
        return _PARAMS[name]
    cls = SCHEDULES[name]
    return tuple(f.name for f in dataclasses.fields(cls) if f.name != "name")


def get(name: str, **params) -> Schedule:
    """Build a schedule by name, e.g. ``get("cosine")`` or ``get("edm", sigma_max=80.0)``.

    Names: ``ddpm_linear``, ``scaled_linear`` (both accept ``zero_terminal_snr=True``), ``cosine``,
    ``shifted_cosine``, ``sigmoid``, ``ve``, ``edm``, ``rectified_flow``. Unknown names or
    parameters raise ``ValueError`` listing what is accepted.
    """
    if isinstance(name, Schedule):
        if params:
            raise ValueError("pass parameters only together with a schedule name")
        return name
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    valid = _valid_params(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"schedule {name!r} got unknown parameter(s) {unknown}; it accepts {list(valid)}"
        )
    return SCHEDULES[name](**params)

