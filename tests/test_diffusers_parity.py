"""Float64 parity of our deterministic samplers with the reference schedulers in diffusers.

On the DDPM-linear schedule (betas = linspace(1e-4, 0.02, 1000)) our ``ddim``, ``dpmpp_2m``,
``dpmpp_3m``, ``euler``, ``heun`` and ``unipc`` samplers must reproduce, state by state, the
trajectories of diffusers' ``DDIMScheduler``, ``DPMSolverMultistepScheduler`` (DPM-Solver++ 2M and,
with ``solver_order=3``, 3M), ``EulerDiscreteScheduler``, ``HeunDiscreteScheduler`` and
``UniPCMultistepScheduler`` (bh2, ``solver_order`` 2 and 3) when both are driven by the same
noise-prediction function at the same timesteps and start from the same noise.

Conventions (see ``diffusion_jax.schedules.DiscreteVP``): diffusers' integer timestep ``k`` is our
time ``t = (k + 1) / 1000``, whose alpha-bar is diffusers' ``alphas_cumprod[k]``. Our samplers keep
the state ``x_t = alpha x0 + sigma eps``; diffusers' DDIM and DPM-Solver keep the same ``x``, while
its Euler and Heun schedulers keep ``xbar = x / alpha = x * sqrt(1 + sigmabar^2)`` (sigmabar =
``scheduler.sigmas``) and hand the model ``scale_model_input(xbar) = x``.

Making diffusers run in float64:

* the schedulers build ``betas`` / ``alphas_cumprod`` in float32, so after construction we replace
  every table that ``set_timesteps`` and ``step`` read with float64 tensors made from our schedule's
  ``alpha_bar_table()``;
* ``set_timesteps`` casts the sigma tables to float32 (``.astype(np.float32)``), and the DPM-Solver
  and Euler ``step`` cast the state to float32 (``sample.to(torch.float32)``). For the duration of a
  test we give the scheduler's module ``np`` / ``torch`` globals in which ``float32`` names
  ``float64`` (:class:`_Float32IsFloat64`); nothing else about diffusers' code changes. Each test
  then checks that the tables diffusers built are float64 and agree with our schedule: alpha-bar
  to 1e-14, sigmabar to 1e-12 (1 - alpha-bar near t = 0 amplifies round-off; see
  :func:`_check_sigma_table`).

Tolerance: every state of our trajectory must match diffusers' to ``RTOL = 1e-10`` relative to the
state's largest entry. Both sides compute the same update formulas in float64 (unit round-off
1.1e-16), written differently (ratios of alpha and sigma and ``expm1`` on our side, sigmabar and
``exp(-h) - 1`` in diffusers) and, for Euler/Heun, with states scaled by up to sigmabar ~ 157 in
diffusers. Over 10-19 model calls the observed errors are at most ~3e-15 (DPM-Solver++(3M) and
UniPC, whose weights we compute with a series for phi_k at small steps where diffusers uses a
recurrence: at most 8.6e-16), so 1e-10 leaves a wide
margin for round-off (other BLAS / platforms) while staying many orders of magnitude below any real
algorithmic difference: a first-order step in place of a second-order one changes the states by
~1e-1, an off-by-one timestep by ~1e-2, and even diffusers' own float32 state cast (left in place)
by ~1e-7. :func:`test_parity_check_detects_a_perturbed_model` checks that a 1e-7 relative
perturbation of the model on our side alone breaks the agreement.
"""

from __future__ import annotations

import functools
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from diffusion_jax import samplers, schedules  # noqa: E402

# torch's Tensor.__array__ predates NumPy 2's copy keyword; diffusers' set_timesteps calls
# np.array(tensor), which warns about it whatever the dtype. Not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

NUM_TRAIN_TIMESTEPS = 1000
NUM_STEPS = 10  # num_inference_steps: integer timesteps for every spacing used below
BATCH, DIM = 3, 16
RTOL = 1e-10  # trajectory agreement, relative to each state's largest entry (see module docstring)
TABLE_RTOL = 1e-14  # agreement of diffusers' float64 alpha-bar tables with our schedule
SIGMABAR_RTOL = 1e-12  # and of its sigmabar, ill-conditioned near t = 0 (see _check_sigma_table)

SCHEDULE = schedules.get("ddpm_linear")
DDPM_LINEAR = dict(
    num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=1e-4, beta_end=0.02, beta_schedule="linear"
)

_rng = np.random.default_rng(20240607)
_W = _rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)
_NOISE = _rng.standard_normal((BATCH, DIM))


# --------------------------------------------------------------------------------------------
# The model: one smooth, nonlinear eps(x, k) written once for torch and once for jax.numpy.
# --------------------------------------------------------------------------------------------


def _eps_formula(x, k, w, sin, cos, tanh):
    """eps(x, k) = tanh(c(k) * W x) + 0.1 x + 0.05 cos(k / 220), c(k) = 1 + 0.5 sin(k / 150).

    x: [batch, DIM]; k: the diffusers timestep, shaped [batch, 1] or [1, 1] (a float, possibly
    fractional on our side where it is t * 1000 - 1).
    """
    scale = 1.0 + 0.5 * sin(k / 150.0)
    return tanh((x @ w.T) * scale) + 0.1 * x + 0.05 * cos(k / 220.0)


class _CountingTorchEps:
    """The torch side of the model; counts its calls (diffusers' number of model evaluations)."""

    def __init__(self):
        self.calls = 0
        self._w = torch.from_numpy(_W)

    def __call__(self, x, timestep):
        assert x.dtype == torch.float64
        self.calls += 1
        k = torch.as_tensor(timestep).to(torch.float64).reshape(-1, 1)
        return _eps_formula(x, k, self._w, torch.sin, torch.cos, torch.tanh)


def _make_denoise_fn(relative_perturbation=0.0):
    """Our side: x0_hat = (x - sigma(t) eps(x, k)) / alpha(t) with k = t * 1000 - 1, in jnp."""

    def denoise_fn(x, t):
        k = (t * NUM_TRAIN_TIMESTEPS - 1.0)[:, None]
        eps = _eps_formula(x, k, jnp.asarray(_W, x.dtype), jnp.sin, jnp.cos, jnp.tanh)
        eps = eps * (1.0 + relative_perturbation)
        alpha = SCHEDULE.alpha(t)[:, None]
        sigma = SCHEDULE.sigma(t)[:, None]
        return (x - sigma * eps) / alpha

    return denoise_fn


# Built once so that the sampler's compiled programs are reused across tests.
_DENOISE_FN = _make_denoise_fn()
_PERTURBED_DENOISE_FN = _make_denoise_fn(1e-7)


def _run_ours(method, network_timesteps, denoise_fn=_DENOISE_FN, **options):
    """Our sampler on time_grid = (k + 1) / 1000; returns (trajectory [N+1, B, D] float64, nfe)."""
    time_grid = (np.asarray(network_timesteps, dtype=np.float64) + 1.0) / NUM_TRAIN_TIMESTEPS
    with jax.enable_x64(True):
        result = samplers.sample(
            denoise_fn,
            jnp.asarray(_NOISE, jnp.float64),
            schedule=SCHEDULE,
            method=method,
            time_grid=time_grid,
            return_trajectory=True,
            **options,
        )
        trajectory = np.asarray(result.trajectory)
    assert trajectory.dtype == np.float64
    assert trajectory.shape == (len(time_grid) + 1, BATCH, DIM)
    return trajectory, result.nfe


def _our_coefficients(network_timesteps):
    """alpha-bar and sigmabar = sigma / alpha of our schedule at t = (k + 1) / 1000, float64."""
    t = (np.asarray(network_timesteps, dtype=np.float64) + 1.0) / NUM_TRAIN_TIMESTEPS
    with jax.enable_x64(True):
        alpha = np.asarray(SCHEDULE.alpha(jnp.asarray(t)))
        sigma = np.asarray(SCHEDULE.sigma(jnp.asarray(t)))
    assert alpha.dtype == sigma.dtype == np.float64
    return alpha**2, sigma / alpha


# --------------------------------------------------------------------------------------------
# Running diffusers in float64.
# --------------------------------------------------------------------------------------------


class _Float32IsFloat64:
    """Stands in for a scheduler module's ``np`` or ``torch`` global: the same module, except that
    ``float32`` is ``float64``, so diffusers' hard-coded float32 casts become float64 ones."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        if name == "float32":
            return self._module.float64
        return getattr(self._module, name)


def _float64_scheduler(monkeypatch, scheduler_cls, **config):
    """A diffusers scheduler on the DDPM-linear schedule whose tables and arithmetic are float64."""
    module = sys.modules[scheduler_cls.__module__]
    for name, lib in (("np", np), ("torch", torch)):
        assert getattr(module, name) is lib, f"{module.__name__} has no global {name!r}"
        monkeypatch.setattr(module, name, _Float32IsFloat64(lib))
    scheduler = scheduler_cls(**DDPM_LINEAR, **config)

    # Replace every table built from the float32 betas by float64 ones from our schedule.
    alpha_bar = torch.tensor(SCHEDULE.alpha_bar_table()[1:], dtype=torch.float64)
    assert alpha_bar.shape == scheduler.alphas_cumprod.shape
    # Sanity: diffusers' float32 table is the same schedule, up to float32 rounding.
    np.testing.assert_allclose(scheduler.alphas_cumprod.double(), alpha_bar, rtol=1e-5)
    scheduler.alphas_cumprod = alpha_bar
    if hasattr(scheduler, "final_alpha_cumprod"):  # DDIM with set_alpha_to_one=True
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(scheduler, "lambda_t"):  # DPM-Solver (read by set_timesteps)
        scheduler.alpha_t = torch.sqrt(alpha_bar)
        scheduler.sigma_t = torch.sqrt(1.0 - alpha_bar)
        scheduler.lambda_t = torch.log(scheduler.alpha_t) - torch.log(scheduler.sigma_t)
        scheduler.sigmas = ((1.0 - alpha_bar) / alpha_bar) ** 0.5
    return scheduler


def _integer_timesteps(timesteps):
    values = timesteps.detach().cpu().numpy().astype(np.float64)
    assert np.array_equal(values, np.round(values)), values
    return values.astype(np.int64)


def _check_sigma_table(scheduler, network_timesteps):
    """diffusers' sigmas after set_timesteps: float64, equal to our sigmabar (then 0 at the end).

    The alpha-bar they encode, 1 / (1 + sigmabar^2), must agree to TABLE_RTOL. sigmabar itself
    is compared to SIGMABAR_RTOL: both sides form 1 - alpha-bar from an alpha-bar near 1 (0.9999 at
    k = 0), which turns float64 round-off into a relative error of up to ~1e-16 / (1 - alpha-bar)
    in sigmabar (6e-14 observed at k = 0).
    """
    assert scheduler.sigmas.dtype == torch.float64
    our_alpha_bar, our_sigmabar = _our_coefficients(network_timesteps)
    distinct = torch.unique_consecutive(scheduler.sigmas).numpy()
    assert len(distinct) == len(network_timesteps) + 1 and distinct[-1] == 0.0
    their_alpha_bar = 1.0 / (1.0 + distinct[:-1] ** 2)
    np.testing.assert_allclose(their_alpha_bar, our_alpha_bar, rtol=TABLE_RTOL, atol=0)
    np.testing.assert_allclose(distinct[:-1], our_sigmabar, rtol=SIGMABAR_RTOL, atol=0)
    return np.concatenate([our_sigmabar, [0.0]])


def _assert_trajectories_match(ours, theirs, what):
    """Every state agrees to RTOL relative to its largest entry; returns the worst such error."""
    theirs = np.stack([np.asarray(state) for state in theirs])
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    assert np.all(np.isfinite(theirs))
    errors = np.abs(ours - theirs).max(axis=(1, 2)) / np.abs(theirs).max(axis=(1, 2))
    worst = float(errors.max())
    per_step = np.array2string(errors, precision=1)
    print(f"{what}: max relative state error {worst:.2e} (per step: {per_step})")
    assert worst <= RTOL, f"{what}: states differ, relative errors per step {errors}"
    return worst


# --------------------------------------------------------------------------------------------
# Driving loops, one per scheduler. Each returns (network timesteps, states in x variables,
# number of model calls).
# --------------------------------------------------------------------------------------------


def _run_diffusers_ddim(monkeypatch, spacing, eps_fn):
    scheduler = _float64_scheduler(
        monkeypatch,
        diffusers.DDIMScheduler,
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing=spacing,
        prediction_type="epsilon",
    )
    scheduler.set_timesteps(NUM_STEPS)
    timesteps = _integer_timesteps(scheduler.timesteps)
    # DDIM steps from k to k - 1000 // N: that must be the next timestep (then < 0: alpha-bar 1).
    stride = NUM_TRAIN_TIMESTEPS // NUM_STEPS
    np.testing.assert_array_equal(np.diff(timesteps), -stride)
    assert timesteps[-1] - stride < 0
    alpha_bar = scheduler.alphas_cumprod[torch.from_numpy(timesteps)]
    assert alpha_bar.dtype == torch.float64
    np.testing.assert_allclose(alpha_bar, _our_coefficients(timesteps)[0], rtol=TABLE_RTOL, atol=0)

    x = torch.from_numpy(_NOISE.copy()) * scheduler.init_noise_sigma  # = 1
    states = [x]
    for timestep in scheduler.timesteps:
        x = scheduler.step(eps_fn(x, timestep), timestep, x, eta=0.0).prev_sample
        states.append(x)
    return timesteps, states


def _run_diffusers_dpmpp(monkeypatch, spacing, eps_fn, order, num_steps=NUM_STEPS):
    scheduler = _float64_scheduler(
        monkeypatch,
        diffusers.DPMSolverMultistepScheduler,
        algorithm_type="dpmsolver++",
        solver_order=order,
        solver_type="midpoint",
        final_sigmas_type="zero",
        lower_order_final=True,
        timestep_spacing=spacing,
        prediction_type="epsilon",
    )
    scheduler.set_timesteps(num_steps)
    timesteps = _integer_timesteps(scheduler.timesteps)
    _check_sigma_table(scheduler, timesteps)
    # Record which update each step used, and check it is what our dpmpp_2m / dpmpp_3m take:
    # warm-up orders 1 (and 2), then `order`; the final step (to sigma = 0) first order, and for
    # 3M with fewer than 15 steps (lower_order_final) the one before it second order.
    orders = _record_dpm_solver_orders(scheduler)
    states = _step_dpm_solver(scheduler, eps_fn)
    tail = [2, 1] if order == 3 and num_steps < 15 else [1]
    warm_up = list(range(1, order))
    assert orders == warm_up + [order] * (num_steps - len(warm_up) - len(tail)) + tail
    return timesteps, states


def _record_dpm_solver_orders(scheduler):
    """Make the scheduler append the order of each update it takes to the returned list."""
    orders = []
    names = ["dpm_solver_first_order_update", "multistep_dpm_solver_second_order_update",
             "multistep_dpm_solver_third_order_update"]
    for order, name in enumerate(names, start=1):
        def recording(*args, _order=order, _update=getattr(scheduler, name), **kwargs):
            orders.append(_order)
            return _update(*args, **kwargs)

        setattr(scheduler, name, recording)
    return orders


def _step_dpm_solver(scheduler, eps_fn):
    x = torch.from_numpy(_NOISE.copy()) * scheduler.init_noise_sigma  # = 1
    states = [x]
    for timestep in scheduler.timesteps:
        x = scheduler.step(eps_fn(x, timestep), timestep, x).prev_sample
        assert x.dtype == torch.float64
        states.append(x)
    return states


def _run_diffusers_unipc(monkeypatch, spacing, eps_fn, order):
    scheduler = _float64_scheduler(
        monkeypatch,
        diffusers.UniPCMultistepScheduler,
        solver_order=order,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
        disable_corrector=[],
        final_sigmas_type="zero",
        timestep_spacing=spacing,
        prediction_type="epsilon",
    )
    scheduler.set_timesteps(NUM_STEPS)
    timesteps = _integer_timesteps(scheduler.timesteps)
    _check_sigma_table(scheduler, timesteps)
    corrector_orders = []
    corrector = scheduler.multistep_uni_c_bh_update

    def recording_corrector(*args, **kwargs):
        corrector_orders.append(kwargs["order"])
        return corrector(*args, **kwargs)

    scheduler.multistep_uni_c_bh_update = recording_corrector
    # diffusers' states are the predictor's outputs, where the model is evaluated; UniC's
    # corrected states only enter the next predictor step. Our trajectory records the same.
    x = torch.from_numpy(_NOISE.copy()) * scheduler.init_noise_sigma  # = 1
    states, predictor_orders = [x], []
    for timestep in scheduler.timesteps:
        x = scheduler.step(eps_fn(x, timestep), timestep, x).prev_sample
        assert x.dtype == torch.float64
        states.append(x)
        predictor_orders.append(scheduler.this_order)
    # Warm-up, then `order`, lowered for the last steps: min(order, i + 1, steps left); UniC at
    # every step after the first, of the order of the step it corrects.
    expected = [min(order, i + 1, NUM_STEPS - i) for i in range(NUM_STEPS)]
    assert predictor_orders == expected and corrector_orders == expected[:-1]
    return timesteps, states


def _run_diffusers_euler(monkeypatch, spacing, eps_fn):
    scheduler = _float64_scheduler(
        monkeypatch,
        diffusers.EulerDiscreteScheduler,
        timestep_spacing=spacing,
        prediction_type="epsilon",
        interpolation_type="linear",
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(NUM_STEPS)
    timesteps = _integer_timesteps(scheduler.timesteps)
    sigmabar = _check_sigma_table(scheduler, timesteps)

    # diffusers' state is xbar = x * sqrt(1 + sigmabar^2). Start from xbar = noise * sqrt(1 +
    # sigmabar_0^2), i.e. x = noise as on our side. (init_noise_sigma is that factor only for
    # "leading" spacing; for "linspace"/"trailing" it is sigmabar_0, k-diffusion's convention, which
    # would start from x = sigma(t_0) * noise instead.)
    scale = np.sqrt(1.0 + sigmabar**2)
    xbar = torch.from_numpy(_NOISE * scale[0])
    states = [xbar / scale[0]]
    for i, timestep in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(xbar, timestep)
        torch.testing.assert_close(model_input, xbar / scale[i], rtol=TABLE_RTOL, atol=0)
        xbar = scheduler.step(eps_fn(model_input, timestep), timestep, xbar).prev_sample
        assert xbar.dtype == torch.float64
        states.append(xbar / scale[i + 1])
    return timesteps, states


def _run_diffusers_heun(monkeypatch, spacing, eps_fn):
    scheduler = _float64_scheduler(
        monkeypatch,
        diffusers.HeunDiscreteScheduler,
        timestep_spacing=spacing,
        prediction_type="epsilon",
        clip_sample=False,
    )
    scheduler.set_timesteps(NUM_STEPS)
    # diffusers lists every model call: k_0, k_1, k_1, ..., k_{N-1}, k_{N-1} (2N - 1 entries).
    timesteps = _integer_timesteps(torch.unique_consecutive(scheduler.timesteps))
    assert len(timesteps) == NUM_STEPS and len(scheduler.timesteps) == 2 * NUM_STEPS - 1
    sigmabar = _check_sigma_table(scheduler, timesteps)

    scale = np.sqrt(1.0 + sigmabar**2)  # x = xbar / scale[j] at whole step j
    xbar = torch.from_numpy(_NOISE * scale[0])  # x = noise, as for Euler above
    states = [xbar / scale[0]]
    for i, timestep in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(xbar, timestep)
        xbar = scheduler.step(eps_fn(model_input, timestep), timestep, xbar).prev_sample
        # A whole step ends after each Heun correction (the scheduler is back in first-order
        # mode) and after the final plain Euler step to sigma = 0.
        if scheduler.state_in_first_order or i == len(scheduler.timesteps) - 1:
            states.append(xbar / scale[len(states)])
    assert len(states) == NUM_STEPS + 1
    return timesteps, states


_DRIVERS = {
    "ddim": _run_diffusers_ddim,
    "dpmpp_2m": functools.partial(_run_diffusers_dpmpp, order=2),
    "dpmpp_3m": functools.partial(_run_diffusers_dpmpp, order=3),
    "euler": _run_diffusers_euler,
    "heun": _run_diffusers_heun,
    "unipc_order_2": functools.partial(_run_diffusers_unipc, order=2),
    "unipc_order_3": functools.partial(_run_diffusers_unipc, order=3),
}
# Our method and options for each driver whose name is not simply our method's.
_OURS = {"unipc_order_2": ("unipc", {"order": 2}), "unipc_order_3": ("unipc", {"order": 3})}


def _check_parity(monkeypatch, case, spacing, **driver_options):
    eps_fn = _CountingTorchEps()
    timesteps, states = _DRIVERS[case](monkeypatch, spacing, eps_fn, **driver_options)
    method, options = _OURS.get(case, (case, {}))
    ours, nfe = _run_ours(method, timesteps, **options)
    assert nfe == eps_fn.calls
    what = f"{case} ({spacing} spacing, k={timesteps.tolist()})"
    return _assert_trajectories_match(ours, states, what)


# --------------------------------------------------------------------------------------------
# The tests.
# --------------------------------------------------------------------------------------------


# DDIMScheduler always steps from k to k - 1000 // N, which is the next timestep only for the
# "leading" (900, 800, ..., 0) and "trailing" (999, 899, ..., 99) spacings.
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_matches_diffusers_ddim_scheduler(monkeypatch, spacing):
    """Our 'ddim' (eta = 0) reproduces diffusers' DDIMScheduler (set_alpha_to_one=True, no
    clipping, eta = 0) state by state in float64, final step to alpha-bar = 1 included, with one
    model call per step on both sides."""
    _check_parity(monkeypatch, "ddim", spacing)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_dpmpp_2m_matches_diffusers_dpm_solver_multistep(monkeypatch, spacing):
    """Our 'dpmpp_2m' reproduces diffusers' DPMSolverMultistepScheduler (algorithm_type=
    "dpmsolver++", solver_order=2, midpoint, final_sigmas_type="zero") state by state in float64:
    first-order first step, second-order multistep updates (with unequal log-SNR steps under
    "linspace" spacing: 999, 899, ..., 500, 400, ...), first-order final step to sigma = 0."""
    _check_parity(monkeypatch, "dpmpp_2m", spacing)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_euler_matches_diffusers_euler_discrete(monkeypatch, spacing):
    """Our 'euler' reproduces diffusers' EulerDiscreteScheduler (s_churn = 0, final sigma 0) state
    by state in float64, after mapping diffusers' scaled state xbar to x = xbar / sqrt(1 +
    sigmabar^2); one model call per step on both sides."""
    _check_parity(monkeypatch, "euler", spacing)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_heun_matches_diffusers_heun_discrete(monkeypatch, spacing):
    """Our 'heun' (EDM Algorithm 2, S_churn = 0) reproduces diffusers' HeunDiscreteScheduler at
    every whole step in float64 (states mapped from xbar to x): Heun corrections on all steps but
    the last, a plain Euler step to sigma = 0, and 2N - 1 model calls on both sides."""
    _check_parity(monkeypatch, "heun", spacing)


@pytest.mark.parametrize("spacing,num_steps", [("linspace", 10), ("leading", 10), ("trailing", 10),
                                               ("trailing", 16)])
def test_dpmpp_3m_matches_diffusers_dpm_solver_multistep_order_3(monkeypatch, spacing, num_steps):
    """Our 'dpmpp_3m' (default d2_weight = 1) reproduces diffusers' DPMSolverMultistepScheduler
    (algorithm_type="dpmsolver++", solver_order=3, lower_order_final, final sigma 0) state by
    state in float64: orders 1, 2, then 3, with the last step first order and, below 15 steps,
    the one before it second order (16 steps: third order up to the last). Worst relative state
    error observed: 8.6e-16."""
    _check_parity(monkeypatch, "dpmpp_3m", spacing, num_steps=num_steps)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("order", [2, 3])
def test_unipc_matches_diffusers_unipc_multistep(monkeypatch, spacing, order):
    """Our 'unipc' reproduces diffusers' UniPCMultistepScheduler (bh2, predict_x0, solver_order =
    order, lower_order_final, no disabled corrector, final sigma 0) state by state in float64: the
    predictor's states, UniC applied at every step after the first, one model call per step.
    Worst relative state error observed: 7.0e-16."""
    _check_parity(monkeypatch, f"unipc_order_{order}", spacing)


@pytest.mark.parametrize("method", sorted(_DRIVERS))
def test_parity_check_detects_a_perturbed_model(monkeypatch, method):
    """The comparison has teeth: scaling our model's eps by (1 + 1e-7), on our side only, moves our
    trajectory away from diffusers' by far more than RTOL."""
    eps_fn = _CountingTorchEps()
    timesteps, states = _DRIVERS[method](monkeypatch, "trailing", eps_fn)
    ours_method, options = _OURS.get(method, (method, {}))
    ours, _ = _run_ours(ours_method, timesteps, denoise_fn=_PERTURBED_DENOISE_FN, **options)
    with pytest.raises(AssertionError, match="states differ"):
        _assert_trajectories_match(ours, states, f"{method} with a perturbed model")
