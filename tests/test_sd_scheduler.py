"""Diffusers scheduler configs -> our samplers: state-by-state parity with diffusers in float64.

For each case a config dict builds both sides: ``Cls.from_config(config)`` in diffusers, and
``pretrained.scheduler.plan_from_config(config)`` here, sampled with
``samplers.sample(denoise_fn, noise, **plan.sample_kwargs(N))``. Both are driven by one toy
network ``out(x, k)`` (written in torch and in jax.numpy; read as eps, v or x0 by the config's
prediction_type) from the same noise; the stochastic schedulers get our sampler's per-step noise.

Float64 on both sides, as in ``tests/test_diffusers_parity.py``: the scheduler module's ``np`` and
``torch`` globals are replaced for the test by ones whose ``float32`` is ``float64`` (diffusers
hard-codes float32 casts), and its alpha-bar tables by float64 ones from our schedule (with
diffusers' 2^-24 stand-in for a zero alpha-bar where its class puts one).

Exact cases: every state of our trajectory equals diffusers' (its xbar = x / alpha mapped to x for
the Euler-type schedulers) to ``RTOL = 1e-10`` relative to the state's largest entry, and the
network sees diffusers' timesteps to 1e-9. Both sides compute the same formulas in float64 written
differently; observed errors are at most a few 1e-15 (printed with ``-s``), while an off-by-one
timestep changes the states by ~1e-2 and even a float32 cast by ~1e-7.

Approximate cases (see the module docstring of ``diffusion_jax.pretrained.scheduler``): the
network's timesteps differ from diffusers' by at most ``max_timestep_gap`` and the states by at
most ``rtol``; both bounds are a few times the measured worst error, printed by each test.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from diffusion_jax import analytic, parameterization, samplers, schedules  # noqa: E402
from diffusion_jax.pretrained import scheduler as scheduler_lib  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

RTOL = 1e-10
TIMESTEP_ATOL = 1e-9
BATCH, DIM = 3, 16
_rng = np.random.default_rng(20250101)
_W = _rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)
_NOISE = _rng.standard_normal((BATCH, DIM))
_KEY_SEED = 7

# The configs the big pipelines ship (trimmed of keys that do not change sampling).
SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None, "clip_sample": False}
SD21 = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
        "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
SDXL = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0",
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
        "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
        "trained_betas": None, "use_karras_sigmas": False}
_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "num_train_timesteps": 1000}
DPM = {"_class_name": "DPMSolverMultistepScheduler", **_SD_BETAS, "algorithm_type": "dpmsolver++",
       "solver_order": 2, "steps_offset": 1, "timestep_spacing": "leading"}
UNIPC = {"_class_name": "UniPCMultistepScheduler", **_SD_BETAS, "solver_order": 2}
EULER_A = {"_class_name": "EulerAncestralDiscreteScheduler", **_SD_BETAS, "steps_offset": 1,
           "timestep_spacing": "leading"}
DDPM = {"_class_name": "DDPMScheduler", **_SD_BETAS, "clip_sample": False, "steps_offset": 1}
HEUN = {"_class_name": "HeunDiscreteScheduler", **_SD_BETAS}
ZERO_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
            "prediction_type": "v_prediction"}


# --------------------------------------------------------------------------------------------
# The network, once for torch and once for jax.numpy.
# --------------------------------------------------------------------------------------------


def _network(x, k, w, sin, cos, tanh):
    """out(x, k) = tanh(c(k) W x) + 0.1 x + 0.05 cos(k / 220), c(k) = 1 + 0.5 sin(k / 150)."""
    return tanh((x @ w.T) * (1.0 + 0.5 * sin(k / 150.0))) + 0.1 * x + 0.05 * cos(k / 220.0)


class _TorchNetwork:
    """The diffusers side: records the timesteps it is fed."""

    def __init__(self):
        self.timesteps = []
        self._w = torch.from_numpy(_W)

    def __call__(self, x, timestep):
        assert x.dtype == torch.float64
        self.timesteps.append(float(timestep))
        k = torch.as_tensor(timestep).to(torch.float64).reshape(-1, 1)
        return _network(x, k, self._w, torch.sin, torch.cos, torch.tanh)


@functools.lru_cache(maxsize=None)
def _denoise_fn(schedule, prediction):
    """Our side, as a pipeline builds it: the network fed k = T t - 1 behind make_denoise_fn."""
    big_t = schedule.num_timesteps

    def apply_fn(x, t):
        k = (t * big_t - 1.0)[:, None]
        return _network(x, k, jnp.asarray(_W, x.dtype), jnp.sin, jnp.cos, jnp.tanh)

    return parameterization.make_denoise_fn(apply_fn, schedule, prediction)


# --------------------------------------------------------------------------------------------
# Diffusers in float64.
# --------------------------------------------------------------------------------------------


class _Float32IsFloat64:
    """A module's ``np`` or ``torch`` global whose ``float32`` is ``float64``."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, "float64" if name == "float32" else name)


def _float64_scheduler(monkeypatch, config, plan):
    """``Cls.from_config(config)`` computing in float64 on our schedule's alpha-bar table."""
    cls = getattr(diffusers, config["_class_name"])
    module = sys.modules[cls.__module__]
    for name, lib in (("np", np), ("torch", torch)):
        monkeypatch.setattr(module, name, _Float32IsFloat64(lib))
    scheduler = cls.from_config(config)
    alpha_bar = plan.schedule.alpha_bar_table()[1:].copy()
    if plan.schedule.zero_terminal_snr and scheduler_lib.SCHEDULER_CLASSES[
            config["_class_name"]].zero_snr_stand_in:
        alpha_bar[-1] = 2.0**-24
    alpha_bar = torch.tensor(alpha_bar, dtype=torch.float64)
    np.testing.assert_allclose(scheduler.alphas_cumprod.double(), alpha_bar, rtol=1e-6, atol=1e-12)
    scheduler.alphas_cumprod = alpha_bar
    if hasattr(scheduler, "final_alpha_cumprod"):  # DDIM, PNDM
        one = scheduler.config.set_alpha_to_one
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if one else (
            alpha_bar[0])
    if hasattr(scheduler, "one"):  # DDPM
        scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(scheduler, "lambda_t"):  # DPM-Solver, UniPC
        scheduler.alpha_t = torch.sqrt(alpha_bar)
        scheduler.sigma_t = torch.sqrt(1.0 - alpha_bar)
        scheduler.lambda_t = torch.log(scheduler.alpha_t) - torch.log(scheduler.sigma_t)
        scheduler.sigmas = ((1.0 - alpha_bar) / alpha_bar) ** 0.5
    return scheduler


def _our_noise(num_steps):
    """The fresh noise our stochastic samplers draw at each step (see samplers._sample_impl)."""
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(_KEY_SEED), num_steps)
        return [np.asarray(jax.random.normal(k, (BATCH, DIM), jnp.float64)) for k in keys]


def _run_diffusers(monkeypatch, config, plan, num_steps, eta=0.0):
    """diffusers' sampling loop; returns (its timesteps, its states mapped to x, network)."""
    scheduler = _float64_scheduler(monkeypatch, config, plan)
    scheduler.set_timesteps(num_steps)
    network = _TorchNetwork()
    noises = [torch.from_numpy(z.copy()) for z in _our_noise(num_steps)]
    step = {"i": 0}  # the whole step being taken, for the injected noise

    def injected_noise(shape, **kwargs):
        assert tuple(shape) == (BATCH, DIM)
        return noises[step["i"]]

    module = sys.modules[type(scheduler).__module__]
    if hasattr(module, "randn_tensor"):
        monkeypatch.setattr(module, "randn_tensor", injected_noise)
    name = config["_class_name"]
    sigma_type = name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                          "HeunDiscreteScheduler")

    def as_x(state):  # diffusers' Euler-type state is xbar = x sqrt(1 + sigmabar^2)
        if not sigma_type:
            return state
        index = min(scheduler.step_index or 0, len(scheduler.sigmas) - 1)
        return state / torch.sqrt(1.0 + scheduler.sigmas[index] ** 2)

    x = torch.from_numpy(_NOISE.copy()) * scheduler.init_noise_sigma
    states = [as_x(x)]
    calls = len(scheduler.timesteps)
    for call, timestep in enumerate(scheduler.timesteps):
        out = network(scheduler.scale_model_input(x, timestep), timestep)
        kwargs = {}
        if name == "DDIMScheduler":
            kwargs = {"eta": eta, "variance_noise": noises[step["i"]] if eta > 0 else None}
        if name == "DDPMScheduler" and call == calls - 1 and "t_end" not in plan.sample_kwargs(
                num_steps):
            # The last step goes to alpha-bar 1, where diffusers clamps the posterior variance 0
            # to 1e-20 and so adds 1e-10 times its noise; our final step adds none.
            noises[step["i"]] = torch.zeros(BATCH, DIM, dtype=torch.float64)
        x = scheduler.step(out, timestep, x, **kwargs).prev_sample
        assert x.dtype == torch.float64
        if name == "HeunDiscreteScheduler":  # a whole step ends after each correction
            whole = scheduler.state_in_first_order or call == calls - 1
        else:  # PNDM's first step is redone by its second call
            whole = name != "PNDMScheduler" or call > 0 or calls == 1
        if whole:
            states.append(as_x(x))
            step["i"] += 1
    timesteps = torch.unique_consecutive(scheduler.timesteps).numpy().astype(np.float64)
    return timesteps, np.stack([np.asarray(s) for s in states]), network


def _run_ours(plan, num_steps):
    with jax.enable_x64(True):
        result = samplers.sample(
            _denoise_fn(plan.schedule, plan.prediction), jnp.asarray(_NOISE, jnp.float64),
            key=jax.random.key(_KEY_SEED), return_trajectory=True, **plan.sample_kwargs(num_steps))
        trajectory = np.asarray(result.trajectory)
    assert trajectory.dtype == np.float64
    return trajectory, result.nfe


def _compare(monkeypatch, config, num_steps, rtol=RTOL, max_timestep_gap=TIMESTEP_ATOL, eta=0.0):
    """Run both sides; check timesteps, model calls and states; return the worst errors."""
    plan = scheduler_lib.plan_from_config(config)
    if eta:
        plan = dataclasses.replace(plan, options={"eta": eta})
    theirs_k, theirs, network = _run_diffusers(monkeypatch, config, plan, num_steps, eta)
    ours, nfe = _run_ours(plan, num_steps)
    ours_k = plan.network_timesteps(num_steps)
    assert ours_k.shape == theirs_k.shape, (ours_k, theirs_k)
    timestep_gap = float(np.max(np.abs(ours_k - theirs_k)))
    assert nfe == len(network.timesteps)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    errors = np.abs(ours - theirs).max(axis=(1, 2)) / np.abs(theirs).max(axis=(1, 2))
    worst = float(errors.max())
    print(f"{config['_class_name']} {num_steps} steps -> {plan.method}: worst relative state "
          f"error {worst:.2e}, final {errors[-1]:.2e}, worst timestep gap {timestep_gap:.2e}")
    assert timestep_gap <= max_timestep_gap, (ours_k, theirs_k)
    assert worst <= rtol, errors
    return worst, timestep_gap


# --------------------------------------------------------------------------------------------
# Exact cases.
# --------------------------------------------------------------------------------------------

EXACT = {
    "sd15_pndm_leading": (SD15, 10),
    "sd15_pndm_25": (SD15, 25),
    "pndm_trailing_alpha_one": ({**SD15, "timestep_spacing": "trailing",
                                 "set_alpha_to_one": True}, 10),
    "sd21_ddim_leading_v": (SD21, 10),
    "sd21_ddim_25": (SD21, 25),
    "ddim_alpha_one_eps": ({**SD21, "set_alpha_to_one": True, "prediction_type": "epsilon"}, 10),
    "ddim_zero_snr_trailing_v": ({**SD21, **ZERO_SNR}, 10),
    "ddim_zero_snr_trailing_25": ({**SD21, **ZERO_SNR}, 25),
    "ddim_sample_prediction": ({**SD21, "prediction_type": "sample"}, 10),
    "sdxl_euler_leading": (SDXL, 10),
    "sdxl_euler_25": (SDXL, 25),
    "euler_trailing_v": ({**SDXL, "timestep_spacing": "trailing",
                          "prediction_type": "v_prediction"}, 10),
    "euler_linspace_integer": ({**SDXL, "timestep_spacing": "linspace"}, 10),
    "euler_zero_snr_leading": ({**SDXL, **ZERO_SNR, "timestep_spacing": "leading"}, 10),
    "dpmpp_2m_leading": (DPM, 10),
    "dpmpp_2m_25": (DPM, 25),
    "dpmpp_2m_trailing_v": ({**DPM, "timestep_spacing": "trailing",
                             "prediction_type": "v_prediction"}, 10),
    "dpmpp_2m_linspace_euler_at_final": ({**DPM, "timestep_spacing": "linspace",
                                          "euler_at_final": True}, 10),
    "dpmpp_2m_lambda_min_clipped": ({**DPM, "timestep_spacing": "linspace",
                                     "lambda_min_clipped": -2.0}, 10),
    "dpmpp_3m": ({**DPM, "solver_order": 3}, 10),
    "dpm_solver_order_1": ({**DPM, "solver_order": 1}, 10),
    "unipc_linspace": (UNIPC, 10),
    "unipc_3_leading_25": ({**UNIPC, "solver_order": 3, "timestep_spacing": "leading",
                            "steps_offset": 1}, 25),
    "euler_ancestral_leading": (EULER_A, 10),
    "euler_ancestral_trailing_v": ({**EULER_A, "timestep_spacing": "trailing",
                                    "prediction_type": "v_prediction"}, 10),
    "ddpm_leading": (DDPM, 10),
    "ddpm_trailing_v_zero_snr": ({**DDPM, **ZERO_SNR}, 10),
    "ddpm_fixed_small_log": ({**DDPM, "variance_type": "fixed_small_log"}, 10),
    # 7 does not divide 1000: DDPM still steps to the next listed timestep, and ends clean.
    "ddpm_trailing_7": ({**DDPM, "timestep_spacing": "trailing"}, 7),
    "heun_linspace": (HEUN, 10),
    "heun_leading": ({**HEUN, "timestep_spacing": "leading", "steps_offset": 1}, 10),
}
_SLOW_EXACT = {"sd15_pndm_25", "ddpm_fixed_small_log", "sd21_ddim_25", "ddim_zero_snr_trailing_25", "sdxl_euler_25",
               "dpmpp_2m_25", "unipc_3_leading_25", "ddim_sample_prediction",
               "euler_ancestral_trailing_v", "dpm_solver_order_1", "heun_leading"}


@pytest.mark.parametrize("case", [pytest.param(name, marks=pytest.mark.slow)
                                  if name in _SLOW_EXACT else name for name in EXACT])
def test_plan_reproduces_diffusers_exactly(monkeypatch, case):
    """States, timesteps and the number of network calls all agree with diffusers in float64."""
    config, num_steps = EXACT[case]
    _compare(monkeypatch, config, num_steps, max_timestep_gap=TIMESTEP_ATOL)


def test_ddim_with_eta_reproduces_diffusers_given_the_same_noise(monkeypatch):
    """DDIM's eta (a pipeline argument, not a config key) passed as our ddim's option."""
    _compare(monkeypatch, SD21, 10, eta=0.6)


def test_the_comparison_detects_an_off_by_one_timestep(monkeypatch):
    """The checks have teeth: the same plan one timestep later fails them."""
    plan = scheduler_lib.plan_from_config(SD15)
    moved = dataclasses.replace(plan, timesteps=dataclasses.replace(plan.timesteps,
                                                                    steps_offset=2))
    theirs_k, theirs, _ = _run_diffusers(monkeypatch, SD15, plan, 10)
    ours, _ = _run_ours(moved, 10)
    errors = np.abs(ours - theirs).max(axis=(1, 2)) / np.abs(theirs).max(axis=(1, 2))
    assert errors.max() > 1e-4
    np.testing.assert_allclose(moved.network_timesteps(10), theirs_k + 1, atol=TIMESTEP_ATOL)


# --------------------------------------------------------------------------------------------
# Approximate cases: (config, steps, state rtol, largest timestep gap).
# --------------------------------------------------------------------------------------------

APPROXIMATE = {
    # Karras sigmas: diffusers feeds the network rounded timesteps (up to 0.5 away from those
    # of its sigmas); we feed the unrounded ones. Measured: 8.4e-5, 3.7e-5, 8.9e-5.
    "dpmpp_2m_karras": ({**DPM, "use_karras_sigmas": True}, 10, 5e-4, 0.5),
    "dpmpp_2m_karras_25": ({**DPM, "use_karras_sigmas": True}, 25, 5e-4, 0.5),
    "unipc_karras": ({**UNIPC, "use_karras_sigmas": True}, 10, 5e-4, 0.5),
    # Fractional timesteps: diffusers interpolates sigmabar (Karras: log-sigmabar) linearly,
    # ours log-alpha-bar; timesteps 1.4e-3 and 1.0e-2 apart, states 2.1e-7, 1.0e-7, 2.5e-7.
    "euler_linspace_fractional": ({**SDXL, "timestep_spacing": "linspace"}, 25, 1e-6, 5e-3),
    "euler_karras": ({**SDXL, "use_karras_sigmas": True}, 10, 1e-6, 3e-2),
    "heun_linspace_fractional": (HEUN, 25, 1e-6, 5e-3),
    # Zero terminal SNR: diffusers starts at alpha-bar = 2^-24, not 0, whose noise level our
    # schedule reaches at timestep 998.45 (the last interval interpolates sqrt(alpha-bar)
    # linearly to 0). Measured: 2.5e-5 and 2.1e-5.
    "euler_zero_snr_trailing": ({**SDXL, **ZERO_SNR}, 10, 1e-4, 0.6),
    "dpmpp_2m_zero_snr_trailing": ({**DPM, **ZERO_SNR}, 10, 1e-4, 0.6),
    # DDIM's stride (1000 // 30 = 33) does not always reach the next "trailing" timestep (34
    # apart): diffusers' states then lag its timesteps by one, ours do not. Measured: 7.4e-3.
    "ddim_trailing_30": ({**SD21, "timestep_spacing": "trailing"}, 30, 3e-2, TIMESTEP_ATOL),
}
_SLOW_APPROXIMATE = {"dpmpp_2m_karras_25", "unipc_karras", "heun_linspace_fractional",
                     "euler_karras"}


@pytest.mark.parametrize("case", [pytest.param(name, marks=pytest.mark.slow)
                                  if name in _SLOW_APPROXIMATE else name for name in APPROXIMATE])
def test_plan_approximates_diffusers_where_its_timesteps_and_sigmas_disagree(monkeypatch, case):
    """The documented approximations stay within their bounds (worst errors printed)."""
    config, num_steps, rtol, gap = APPROXIMATE[case]
    _compare(monkeypatch, config, num_steps, rtol=rtol, max_timestep_gap=gap)


# --------------------------------------------------------------------------------------------
# The plans of the shipped configs, other samplers, grids.
# --------------------------------------------------------------------------------------------


def test_plans_of_the_stable_diffusion_configs():
    sd15 = scheduler_lib.plan_from_config(SD15)
    assert (sd15.scheduler_class, sd15.method, sd15.prediction) == ("PNDMScheduler", "plms", "eps")
    assert sd15.schedule == schedules.get("scaled_linear")
    kwargs = sd15.sample_kwargs(10)
    np.testing.assert_allclose(kwargs["time_grid"], (np.arange(901, 0, -100) + 1) / 1000)
    assert kwargs["t_end"] == 1e-3 and "prior_scale" not in kwargs  # alpha-bar_0: 1 - beta_0
    sd21 = scheduler_lib.plan_from_config(SD21)
    assert (sd21.method, sd21.options, sd21.prediction) == ("ddim", {"eta": 0.0}, "v")
    assert sd21.sample_kwargs(10)["t_end"] == 1e-3
    assert "t_end" not in scheduler_lib.plan_from_config(
        {**SD21, "set_alpha_to_one": True}).sample_kwargs(10)
    sdxl = scheduler_lib.plan_from_config(SDXL)
    assert (sdxl.method, sdxl.prediction) == ("euler", "eps")
    assert set(sdxl.sample_kwargs(30)) == {"schedule", "method", "time_grid"}
    # Euler with trailing spacing starts from init_noise_sigma = sigmabar_0 in xbar = x / alpha.
    trailing = scheduler_lib.plan_from_config({**SDXL, "timestep_spacing": "trailing"})
    kwargs = trailing.sample_kwargs(10)
    assert kwargs["time_grid"][0] == 1.0
    with jax.enable_x64(True):
        sigma_0 = float(trailing.schedule.sigma(jnp.float64(1.0)))
    assert abs(kwargs["prior_scale"] - sigma_0) < 1e-14


def test_another_sampler_or_grid_on_the_configs_schedule():
    """method= keeps the folder's timesteps but ends at clean data; grid= takes ours."""
    plan = scheduler_lib.plan_from_config(SD15, method="dpmpp_2m")
    assert (plan.method, plan.options, plan.prediction) == ("dpmpp_2m", {}, "eps")
    kwargs = plan.sample_kwargs(10)
    np.testing.assert_array_equal(kwargs["time_grid"],
                                  scheduler_lib.plan_from_config(SD15).sample_kwargs(10)[
                                      "time_grid"])
    assert "t_end" not in kwargs
    plan = scheduler_lib.plan_from_config(SD21, grid="karras")
    assert (plan.method, plan.grid) == ("ddim", "karras")
    kwargs = plan.sample_kwargs(12)
    assert (kwargs["grid"], kwargs["num_steps"], kwargs["eta"]) == ("karras", 12, 0.0)
    assert plan.network_timesteps(12).shape == (12,)
    # Values the chosen sampler does not reproduce are the caller's choice...
    plan = scheduler_lib.plan_from_config({**SD21, "thresholding": True}, method="ddim")
    assert plan.method == "ddim"
    # ...but the timesteps of a sigma schedule we do not compute are refused unless grid= says.
    with pytest.raises(ValueError, match="use_exponential_sigmas=True.*grid="):
        scheduler_lib.plan_from_config({**SDXL, "use_exponential_sigmas": True}, method="euler")
    assert scheduler_lib.plan_from_config({**SDXL, "use_exponential_sigmas": True},
                                          method="euler", grid="logsnr").grid == "logsnr"
    # Another class over DDPM betas: only with method=, on the N timesteps of its spacing.
    lms = {"_class_name": "LMSDiscreteScheduler", **_SD_BETAS, "timestep_spacing": "trailing"}
    with pytest.raises(ValueError, match="LMSDiscreteScheduler.*method="):
        scheduler_lib.plan_from_config(lms)
    plan = scheduler_lib.plan_from_config(lms, method="unipc")
    np.testing.assert_allclose(plan.network_timesteps(4), [999, 749, 499, 249], atol=1e-9)


def test_plms_samples_well_from_pure_noise_and_our_grids():
    """Our plms (SD 1.5's default) on any schedule and grid: far closer to the exact ODE solution
    of a Gaussian than DDIM on the same 20 times (one more evaluation), and finite from zero SNR."""
    rng = np.random.default_rng(0)
    gaussian = analytic.DiagonalGaussian(rng.normal(size=8) * 0.5, rng.uniform(0.05, 1.0, 8))
    with jax.enable_x64(True):
        sched = schedules.get("scaled_linear")
        noise = jax.random.normal(jax.random.key(0), (16, 8), jnp.float64)
        times = samplers.time_grid(sched, 20)
        x_start = gaussian.ode_solution(sched, noise, times[0], times[-2])
        exact = gaussian.denoiser(sched)(x_start, jnp.full((16,), times[-2]))
        errors = {}
        for method in ("plms", "ddim"):
            result = samplers.sample(gaussian.denoiser(sched), noise, schedule=sched,
                                     method=method, time_grid=times[:-1])
            errors[method] = float(jnp.sqrt(jnp.mean((result.samples - exact) ** 2)))
        zero_snr = schedules.get("scaled_linear", zero_terminal_snr=True)
        result = samplers.sample(gaussian.denoiser(zero_snr), noise, schedule=zero_snr,
                                 method="plms", num_steps=8, grid="trailing")
    print("error against the exact solution, 20 steps:", errors)
    assert errors["plms"] < errors["ddim"] / 10, errors
    assert np.all(np.isfinite(np.asarray(result.samples))) and result.nfe == 8


# --------------------------------------------------------------------------------------------
# Reading folders, and refusing what we do not reproduce.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [SD15, SD21, SDXL, DPM, UNIPC, EULER_A, DDPM, HEUN],
                         ids=lambda c: c["_class_name"])
def test_folders_written_by_diffusers_are_read(tmp_path, config):
    """save_pretrained writes every key of the class (with this diffusers version's defaults):
    all are known, and the plan is the one of the dict."""
    getattr(diffusers, config["_class_name"]).from_config(config).save_pretrained(
        tmp_path / "scheduler")
    for folder in (tmp_path / "scheduler", tmp_path):  # the scheduler/ folder or the model's
        read = scheduler_lib.read_scheduler_config(folder)
        assert read["_class_name"] == config["_class_name"]
        plan = scheduler_lib.plan_from_config(read)
        assert plan == scheduler_lib.plan_from_config(config)


def test_unreadable_folders_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        scheduler_lib.read_scheduler_config(tmp_path)
    (tmp_path / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="scheduler_config.json is not valid JSON"):
        scheduler_lib.read_scheduler_config(tmp_path)
    (tmp_path / "scheduler_config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="must hold a JSON object"):
        scheduler_lib.read_scheduler_config(tmp_path)


REFUSED = [
    ({**SD21, "clip_sample": True}, "clip_sample=True"),
    ({key: value for key, value in SD21.items() if key != "clip_sample"}, "clip_sample=True"),
    ({**SD21, "thresholding": True}, "thresholding=True"),
    ({**SDXL, "beta_schedule": "squaredcos_cap_v2"}, "beta_schedule='squaredcos_cap_v2'"),
    ({**SD15, "trained_betas": [0.01] * 1000}, "trained_betas"),
    ({**SDXL, "timestep_type": "continuous", "prediction_type": "v_prediction"},
     "timestep_type='continuous'"),
    ({**SDXL, "final_sigmas_type": "sigma_min"}, "final_sigmas_type='sigma_min'"),
    ({**SDXL, "interpolation_type": "log_linear"}, "interpolation_type='log_linear'"),
    ({**SDXL, "use_exponential_sigmas": True}, "use_exponential_sigmas=True"),
    ({**SDXL, "timestep_spacing": "sometimes"}, "timestep_spacing='sometimes'"),
    ({**SDXL, "prediction_type": "flow_prediction"}, "prediction_type='flow_prediction'"),
    ({**DPM, "use_lu_lambdas": True}, "use_lu_lambdas=True"),
    ({**DPM, "algorithm_type": "sde-dpmsolver++"}, "algorithm_type='sde-dpmsolver\\+\\+'"),
    ({**DPM, "solver_type": "heun"}, "solver_type='heun'"),
    ({**DPM, "variance_type": "learned_range"}, "variance_type='learned_range'"),
    ({**DPM, "final_sigmas_type": "sigma_min"}, "final_sigmas_type='sigma_min'"),
    ({**DPM, "solver_order": 3, "lower_order_final": False}, "lower_order_final=False"),
    ({**DPM, "use_flow_sigmas": True}, "use_flow_sigmas=True"),
    ({**DDPM, "variance_type": "fixed_large"}, "variance_type='fixed_large'"),
    ({**UNIPC, "solver_type": "bh1"}, "solver_type='bh1'"),
    ({**UNIPC, "solver_order": 1}, "solver_order=1"),
    ({**UNIPC, "disable_corrector": [0]}, "disable_corrector=\\[0\\]"),
    ({**SD15, "skip_prk_steps": False}, "skip_prk_steps=False"),
    ({**SD15, "prediction_type": "v_prediction"}, "prediction_type='v_prediction'"),
    ({**HEUN, "clip_sample": True}, "clip_sample=True"),
    ({**SDXL, "mystery_key": 1}, "keys \\['mystery_key'\\].*not known"),
    ({**SD21, **ZERO_SNR, "prediction_type": "epsilon"}, "rescale_betas_zero_snr=True with "
     "prediction_type='epsilon'"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
      "shift": 3.0}, "_class_name='FlowMatchEulerDiscreteScheduler'.*not one of DDPM betas"),
    ({"_class_name": "LMSDiscreteScheduler", **_SD_BETAS}, "LMSDiscreteScheduler.*method="),
]


@pytest.mark.parametrize("config,message", REFUSED, ids=[m[:30] for _, m in REFUSED])
def test_unsupported_values_are_refused_by_name(config, message):
    """Each refusal names the key and value and, where another sampler would do, the way out."""
    with pytest.raises(ValueError, match=message) as error:
        scheduler_lib.plan_from_config(config)
    keys_about_the_schedule = ("beta_schedule", "trained_betas", "mystery", "FlowMatch", "rescale",
                               "flow_prediction")
    if not any(key in message for key in keys_about_the_schedule):
        assert "method=" in str(error.value) or "grid=" in str(error.value), str(error.value)


def test_bad_arguments_and_step_counts():
    with pytest.raises(ValueError, match="unknown sampler method 'plms2'"):
        scheduler_lib.plan_from_config(SD15, method="plms2")
    with pytest.raises(ValueError, match="unknown time grid 'cosine'"):
        scheduler_lib.plan_from_config(SD15, grid="cosine")
    plan = scheduler_lib.plan_from_config({**SDXL, "timestep_spacing": "trailing"})
    # diffusers' own trailing spacing gives 62 timesteps, the last -1, for 61 steps.
    with pytest.raises(ValueError, match="not 61 distinct ones.*choose another number of steps"):
        plan.sample_kwargs(61)
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        plan.sample_kwargs(0)
    with pytest.raises(ValueError, match="not 1000 distinct ones in \\[0, 999\\]"):
        scheduler_lib.plan_from_config(SD21).sample_kwargs(1000)  # leading + offset 1 -> 1000


def test_sampler_end_time_and_prior_scale():
    """samplers.sample's t_end (stop at a noisy state) and prior_scale (the first state's scale)."""
    sched = schedules.get("scaled_linear")

    def denoise(x, t):
        return 0.5 * x

    noise = jnp.ones((2, 4), jnp.float32)
    grid = [0.9, 0.5, 0.1]
    result = samplers.sample(denoise, noise, schedule=sched, method="ddim", time_grid=grid,
                             t_end=1e-3, prior_scale=0.5, return_trajectory=True)
    assert result.times[-1] == 1e-3
    np.testing.assert_allclose(result.trajectory[0], 0.5 * noise)
    last_t = result.times[-2]
    x = result.trajectory[-2]
    alpha, sigma = sched.alpha(jnp.float32(last_t)), sched.sigma(jnp.float32(last_t))
    alpha_end, sigma_end = sched.alpha(jnp.float32(1e-3)), sched.sigma(jnp.float32(1e-3))
    expected = alpha_end * 0.5 * x + sigma_end * (x - alpha * 0.5 * x) / sigma
    np.testing.assert_allclose(result.samples, expected, rtol=1e-5)
    for bad in (-0.1, 0.9, last_t):
        with pytest.raises(ValueError, match="t_end must lie between 0 and the last network"):
            samplers.sample(denoise, noise, schedule=sched, method="ddim", time_grid=grid,
                            t_end=bad)


def test_ddim_ending_at_its_last_timestep_is_refused():
    """DDIM with linspace spacing and set_alpha_to_one=False lists timestep 0 last and also
    ends at alpha-bar_0, its states lagging its timesteps by more than a stride: refused, with
    the spacings and method= that work instead."""
    plan = scheduler_lib.plan_from_config({**SD21, "timestep_spacing": "linspace"})
    with pytest.raises(ValueError, match="'leading' or 'trailing' spacing, or method="):
        plan.sample_kwargs(10)
    assert "t_end" not in scheduler_lib.plan_from_config(
        {**SD21, "timestep_spacing": "linspace"}, method="ddim").sample_kwargs(10)


def test_unknown_keys_are_refused_only_when_the_schedulers_own_steps_are_reproduced():
    config = {**SD21, "a_future_option": True}
    with pytest.raises(ValueError, match=r"keys \['a_future_option'\].*not known"):
        scheduler_lib.plan_from_config(config)
    plan = scheduler_lib.plan_from_config(config, method="dpmpp_2m")
    assert plan.method == "dpmpp_2m" and plan.prediction == "v"

