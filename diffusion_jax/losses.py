"""The training objective: time sampling, noising, the target and its weighting.

:func:`make_loss_fn` binds the static choices (schedule, prediction target, time sampling,
weighting) and returns a pure ``loss_fn(params, batch, key) -> (loss, aux)``.

Weightings are defined on the squared error of the x0 estimate, ``w(logSNR) * |x0_hat - x0|^2``
(Kingma & Gao 2023 write every common objective this way), and computed in the target's own space
as ``w / r * |output - target|^2``, where ``r`` is that target's error ratio
(:meth:`~diffusion_jax.parameterization.Parameterization.log_mse_ratio`). The weight of an x0
error then does not depend on which target the network predicts, and nothing is divided by a
vanishing SNR. ``mse`` leaves the target's plain squared error unweighted.

=============  ===========================================================  =========================
weighting      weight on the x0 squared error (SNR = exp(logSNR))           reference
=============  ===========================================================  =========================
``mse``        r (plain MSE on whatever the network predicts)               Ho et al. 2020 (with eps)
``snr``        SNR (equals the plain eps MSE)                               Kingma et al. 2021
``min_snr``    min(SNR, gamma), gamma = 5                                   Hang et al. 2023
``edm``        (sigmabar^2 + sigma_data^2) / (sigmabar sigma_data)^2        Karras et al. 2022, Eq. 8
``sigmoid``    SNR * sigmoid(bias - logSNR), i.e. the eps MSE times sigmoid  Kingma & Gao 2023
=============  ===========================================================  =========================

Every weight applies per sample of t: with uniform t, a weight w here is Kingma & Gao's w(lambda)
times the density of t in lambda. Their own parameterisation multiplies by -d logSNR / dt as well,
which makes the objective independent of the schedule; to get it, sample times whose density in
log-SNR is what you want (e.g. ``logit_normal``) rather than rescaling by the derivative, which is
unbounded at the ends of most schedules.

Time sampling (t in [0, 1]): ``uniform``; ``stratified`` (one uniform offset, evenly spaced over
the batch: Kingma et al. 2021's low-discrepancy sampler); ``antithetic`` (pairs t, 1 - t);
``logit_normal`` (t = sigmoid(mean + std * n), Esser et al. 2024); ``edm_lognormal``
(log sigmabar ~ N(p_mean, p_std^2), Karras et al. 2022, mapped to t through the schedule).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from diffusion_jax import parameterization as param_lib
from diffusion_jax import schedules as schedules_lib

__all__ = [
    "TIME_SAMPLING",
    "DiffusionLoss",
    "WEIGHTINGS",
    "sample_time",
    "loss_weight",
    "log_x0_weight",
    "make_loss_fn",
]

_TIME_PARAMS = {
    "uniform": {},
    "stratified": {},
    "antithetic": {},
    "logit_normal": {"mean": 0.0, "std": 1.0},
    "edm_lognormal": {"p_mean": -1.2, "p_std": 1.2},
}
_WEIGHT_PARAMS = {
    "mse": {},
    "snr": {},
    "min_snr": {"gamma": 5.0},
    "edm": {"sigma_data": None},  # None: the parameterization's sigma_data
    "sigmoid": {"bias": 0.0},
}
TIME_SAMPLING = tuple(_TIME_PARAMS)
WEIGHTINGS = tuple(_WEIGHT_PARAMS)


def _merge(kind, name, table, params):
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {tuple(table)}")
    params = dict(params or {})
    unknown = sorted(set(params) - set(table[name]))
    if unknown:
        raise ValueError(
            f"{kind} {name!r} got unknown parameter(s) {unknown}; it accepts "
            f"{sorted(table[name]) if table[name] else 'none'}"
        )
    return {**table[name], **params}


def sample_time(key, batch_size: int, method: str = "uniform", *, schedule=None, dtype=jnp.float32,
                **params):
    """Draw ``batch_size`` training times in [0, 1] (see the module docstring for the methods)."""
    params = _merge("time sampling", method, _TIME_PARAMS, params)
    if method == "uniform":
        return jax.random.uniform(key, (batch_size,), dtype)
    if method == "stratified":
        offset = jax.random.uniform(key, (), dtype)
        return jnp.mod(offset + jnp.arange(batch_size, dtype=dtype) / batch_size, 1.0)
    if method == "antithetic":
        half = jax.random.uniform(key, ((batch_size + 1) // 2,), dtype)
        return jnp.concatenate([half, 1.0 - half])[:batch_size]
    if method == "logit_normal":
        n = jax.random.normal(key, (batch_size,), dtype)
        return jax.nn.sigmoid(params["mean"] + params["std"] * n)
    # edm_lognormal
    if schedule is None:
        raise ValueError("edm_lognormal time sampling needs the schedule")
    schedule = schedules_lib.get(schedule)
    n = jax.random.normal(key, (batch_size,), dtype)
    log_sigmabar = params["p_mean"] + params["p_std"] * n
    return jnp.clip(schedule.t_from_logsnr(-2.0 * log_sigmabar), 0.0, 1.0).astype(dtype)


def log_x0_weight(logsnr, weighting: str, *, default_sigma_data: float = 0.5, **params):
    """log of the weighting's factor on the x0 squared error (``mse`` has none: it returns None).

    ``edm`` uses its ``sigma_data`` parameter, or ``default_sigma_data`` when that is not given.
    """
    params = _merge("weighting", weighting, _WEIGHT_PARAMS, params)
    if weighting == "mse":
        return None
    if weighting == "snr":
        return logsnr
    if weighting == "min_snr":
        return jnp.minimum(logsnr, math.log(params["gamma"]))
    if weighting == "edm":
        sd = params["sigma_data"] if params["sigma_data"] is not None else default_sigma_data
        # (sigmabar^2 + sd^2) / (sigmabar sd)^2 = SNR + 1 / sd^2
        return jnp.logaddexp(logsnr, -2.0 * math.log(sd))
    return logsnr + jax.nn.log_sigmoid(params["bias"] - logsnr)


def loss_weight(logsnr, weighting: str, parameterization, **params):
    """Factor on the target-space squared error: w(logSNR) / r(logSNR).

    The log-SNR is clipped to +-LOGSNR_CLIP first, so the factor is finite even at t = 0 and t = 1.
    """
    parameterization = param_lib.get(parameterization)
    clipped = jnp.clip(logsnr, -param_lib.LOGSNR_CLIP, param_lib.LOGSNR_CLIP)
    log_w = log_x0_weight(
        clipped, weighting, default_sigma_data=parameterization.sigma_data, **params
    )
    if log_w is None:
        return jnp.ones_like(logsnr)
    return jnp.exp(log_w - parameterization.log_mse_ratio(clipped))


class DiffusionLoss:
    """The denoising loss as two stages, drawing the randomness and computing the loss.

    Split so that a data-parallel step can draw all randomness with the global batch's shapes and
    then compute on each device's shard:

    * ``draw(batch, key) -> (batch, draws)``: the optional ``prepare(batch, key)`` transform
      (label or caption dropping), the diffusion times ``t`` and the noise ``eps``, all drawn with
      the global batch's shapes, plus a key for the network (dropout);
    * ``compute(params, batch, draws) -> (loss, aux)``: deterministic given the draws; the mean
      over the batch, so the mean of equal-sized shards' losses is the global loss.

    Calling it, ``loss_fn(params, batch, key)``, runs both.
    """

    def __init__(self, apply_fn, schedule, parameterization, draw_time, weighting, weight_params,
                 data_key, prepare, mask_key=None, project=None):
        self.apply_fn, self.schedule, self.parameterization = apply_fn, schedule, parameterization
        self._draw_time, self.weighting, self._weight_params = draw_time, weighting, weight_params
        self.data_key, self.prepare = data_key, prepare
        self.mask_key, self.project = mask_key, project

    def _mask(self, batch):
        """The batch's mask of present entries, or None (every entry counts)."""
        return batch.get(self.mask_key) if self.mask_key is not None else None

    def _x0(self, batch):
        if self.data_key not in batch:
            raise KeyError(f"batch has no {self.data_key!r} entry (keys: {sorted(batch)})")
        # Noising and the loss run in at least float32 even for bfloat16 data.
        dtype = jnp.promote_types(batch[self.data_key].dtype, jnp.float32)
        return batch[self.data_key].astype(dtype)

    def draw(self, batch, key):
        key_prepare, key_t, key_noise, key_model = jax.random.split(key, 4)
        if self.prepare is not None:
            batch = self.prepare(batch, key_prepare)
        x0 = self._x0(batch)
        t = self._draw_time(key_t, x0.shape[0], x0.dtype)
        eps = jax.random.normal(key_noise, x0.shape, x0.dtype)
        if self.project is not None:
            eps = self.project(eps, self._mask(batch))
        return batch, {"t": t, "eps": eps, "key": key_model}

    def compute(self, params, batch, draws):
        x0 = self._x0(batch)
        if self.project is not None:  # (the sources centre their data; this makes it certain)
            x0 = self.project(x0, self._mask(batch))
        dtype = x0.dtype
        cond = {k: v for k, v in batch.items() if k != self.data_key}
        t, eps = draws["t"], draws["eps"]
        schedule, parameterization = self.schedule, self.parameterization
        alpha_t, sigma_t, logsnr = schedule.alpha(t), schedule.sigma(t), schedule.logsnr(t)
        alpha = param_lib.broadcast_to(alpha_t, x0)
        sigma = param_lib.broadcast_to(sigma_t, x0)
        x_t = alpha * x0 + sigma * eps
        x_in, noise_input = parameterization.network_inputs(x_t, t, alpha_t, sigma_t, logsnr)
        output = self.apply_fn(params, x_in, noise_input, cond, draws["key"])
        target = jax.lax.stop_gradient(parameterization.target(x0, eps, x_t, alpha, sigma))
        axes = tuple(range(1, x0.ndim))
        squared = jnp.square(output.astype(dtype) - target)
        mask = self._mask(batch)
        if mask is None:
            mse = jnp.mean(squared, axis=axes)
        else:  # the mean over present entries: absent ones neither count nor dilute
            mask = jnp.reshape(mask, mask.shape + (1,) * (x0.ndim - mask.ndim)).astype(dtype)
            per_entry = x0[0].size / mask[0].size
            mse = jnp.sum(squared * mask, axis=axes) / jnp.maximum(
                jnp.sum(mask, axis=axes) * per_entry, 1.0)
        weight = loss_weight(logsnr, self.weighting, parameterization, **self._weight_params)
        per_example = weight.astype(dtype) * mse
        aux = {
            "loss_per_example": per_example,
            "mse_per_example": mse,
            "t": t,
            "logsnr": logsnr,
        }
        return jnp.mean(per_example), aux

    def __call__(self, params, batch, key):
        batch, draws = self.draw(batch, key)
        return self.compute(params, batch, draws)


def make_loss_fn(
    apply_fn: Callable[..., jax.Array],
    *,
    schedule,
    parameterization="eps",
    time_sampling: str = "uniform",
    time_sampling_params: Optional[Mapping[str, Any]] = None,
    weighting: str = "mse",
    weighting_params: Optional[Mapping[str, Any]] = None,
    data_key: str = "x",
    prepare: Optional[Callable] = None,
    mask_key: Optional[str] = None,
    project: Optional[Callable] = None,
) -> DiffusionLoss:
    """Build ``loss_fn(params, batch, key) -> (loss, aux)`` (a :class:`DiffusionLoss`).

    ``apply_fn(params, x_in, noise_input, cond, key) -> output`` is the network: ``x_in`` and
    ``noise_input`` come from :meth:`Parameterization.network_inputs` (x_t and t, or EDM's scaled
    input and c_noise), ``cond`` is a dict of every batch entry other than ``data_key`` (labels,
    text embeddings; possibly empty) and ``key`` a PRNG key for dropout.

    ``time_sampling`` is a name from :data:`TIME_SAMPLING` or a function
    ``(key, batch_size, dtype) -> t``. ``batch[data_key]`` holds clean data of shape [batch, ...].
    ``prepare(batch, key) -> batch``, if given, transforms the batch before noising (e.g. drops
    labels for classifier-free guidance). ``aux`` has ``loss_per_example`` (weighted, [batch]),
    ``mse_per_example`` (unweighted target-space MSE), ``t`` and ``logsnr``.

    For sets of varying size, ``batch[mask_key]`` (e.g. [batch, members], 1 for present
    members) restricts the MSE to present entries, and ``project(eps, mask) -> eps`` maps the
    drawn noise into the data's subspace (for equivariant diffusion: positions with zero centre
    of mass, absent members zero; Hoogeboom et al. 2022, section 3.2). The network's output must
    then lie in that subspace too.
    """
    schedule = schedules_lib.get(schedule)
    parameterization = param_lib.get(parameterization)
    if callable(time_sampling):
        if time_sampling_params:
            raise ValueError("time_sampling_params go with a named time sampling, not a function")
        draw_time = time_sampling
    else:
        time_params = _merge("time sampling", time_sampling, _TIME_PARAMS, time_sampling_params)

        def draw_time(key, batch_size, dtype):
            return sample_time(
                key, batch_size, time_sampling, schedule=schedule, dtype=dtype, **time_params
            )

    weight_params = _merge("weighting", weighting, _WEIGHT_PARAMS, weighting_params)
    return DiffusionLoss(apply_fn, schedule, parameterization, draw_time, weighting,
                         weight_params, data_key, prepare, mask_key, project)
