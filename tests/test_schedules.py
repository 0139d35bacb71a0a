"""Schedules: known values, exact discrete tables, identities, inverses and both ends."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import schedules

ALL = sorted(schedules.SCHEDULES)
VARIANCE_PRESERVING = ["ddpm_linear", "scaled_linear", "cosine", "shifted_cosine", "sigmoid"]
INTERIOR = np.linspace(0.01, 0.99, 99)


def test_known_values(x64):
    # DDPM (Ho et al. 2020): prod(1 - beta_i), betas linspace(1e-4, 0.02, 1000).
    ab1 = float(schedules.get("ddpm_linear").alpha(1.0) ** 2)
    assert ab1 == pytest.approx(4.0358e-5, rel=1e-4)
    # Nichol & Dhariwal cosine schedule, s = 0.008.
    ab_half = float(schedules.get("cosine").alpha(0.5) ** 2)
    assert ab_half == pytest.approx(0.49384, abs=1e-5)


@pytest.mark.parametrize(
    "name,betas",
    [
        ("ddpm_linear", np.linspace(1e-4, 0.02, 1000)),
        ("scaled_linear", np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2),
    ],
)
def test_discrete_table_on_lattice(x64, name, betas):
    sched = schedules.get(name)
    alpha_bar = np.cumprod(1.0 - betas)
    i = np.array([1, 2, 17, 250, 500, 999, 1000])
    got = np.asarray(sched.alpha(i / 1000.0)) ** 2
    np.testing.assert_allclose(got, alpha_bar[i - 1], rtol=1e-12)
    assert float(sched.alpha(0.0)) == 1.0 and float(sched.sigma(0.0)) == 0.0
    assert sched.t_min == pytest.approx(1e-3)


def test_zero_terminal_snr_matches_lin_et_al(x64):
    sched = schedules.get("scaled_linear", zero_terminal_snr=True)
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    expected = (sqrt_ab - sqrt_ab[-1]) * sqrt_ab[0] / (sqrt_ab[0] - sqrt_ab[-1])
    i = np.array([1, 10, 500, 999])
    np.testing.assert_allclose(np.asarray(sched.alpha(i / 1000.0)), expected[i - 1], rtol=1e-12)
    assert float(sched.alpha(1.0)) == 0.0
    assert float(sched.sigma(1.0)) == 1.0
    assert float(sched.logsnr(1.0)) == -np.inf
    # The last interval still inverts exactly.
    t = np.array([0.9991, 0.9995, 0.99999])
    np.testing.assert_allclose(np.asarray(sched.t_from_logsnr(sched.logsnr(t))), t, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_identities_and_inverse(x64, name):
    sched = schedules.get(name)
    t = jnp.asarray(INTERIOR)
    alpha, sigma, logsnr = sched.alpha(t), sched.sigma(t), sched.logsnr(t)
    np.testing.assert_allclose(logsnr, np.log(alpha**2 / sigma**2), rtol=1e-10, atol=1e-10)
    assert np.all(np.diff(np.asarray(logsnr)) < 0), "logSNR must decrease strictly in t"
    np.testing.assert_allclose(sched.t_from_logsnr(logsnr), INTERIOR, atol=1e-9)
    if name in VARIANCE_PRESERVING:
        np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-12)
    if name in ("ve", "edm"):
        np.testing.assert_array_equal(alpha, 1.0)
    if name == "rectified_flow":
        np.testing.assert_allclose(alpha, 1 - INTERIOR, atol=1e-15)
        np.testing.assert_allclose(sigma, INTERIOR, atol=1e-15)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_ends_are_finite_or_exact_infinities(x64, name, dtype):
    sched = schedules.get(name)
    t = jnp.asarray([0.0, 1e-6, 1e-4, 1 - 1e-4, 1 - 1e-6, 1.0], dtype)
    alpha, sigma, logsnr = sched.alpha(t), sched.sigma(t), sched.logsnr(t)
    assert np.all(np.isfinite(alpha)) and np.all(np.isfinite(sigma))
    assert np.all(np.asarray(alpha) >= 0) and np.all(np.asarray(sigma) >= 0)
    assert not np.any(np.isnan(logsnr))
    # Infinite log-SNR only where sigma or alpha is exactly zero.
    inf = ~np.isfinite(np.asarray(logsnr))
    assert np.all((np.asarray(sigma)[inf] == 0) | (np.asarray(alpha)[inf] == 0))
    back = sched.t_from_logsnr(logsnr)
    assert np.all(np.isfinite(back))
    # Gradients of the coefficients exist and are finite strictly inside (0, 1).
    grads = jax.vmap(jax.grad(lambda s: sched.alpha(s) + sched.sigma(s)))(t[1:-1])
    assert np.all(np.isfinite(grads))


def test_zero_terminal_snr_schedules():
    for name in ["cosine", "shifted_cosine", "sigmoid", "rectified_flow"]:
        sched = schedules.get(name)
        assert float(sched.alpha(1.0)) == 0.0, name
        assert float(sched.logsnr(1.0)) == -np.inf, name
    assert float(schedules.get("ddpm_linear").alpha(1.0)) > 0


def test_shifted_cosine_shift(x64):
    base = schedules.get("shifted_cosine", resolution=64)
    big = schedules.get("shifted_cosine", resolution=256)
    t = jnp.asarray(INTERIOR)
    np.testing.assert_allclose(big.logsnr(t) - base.logsnr(t), 2 * np.log(64 / 256), atol=1e-12)
    # With no shift it is the s = 0 cosine schedule: logSNR = -2 log tan(pi t / 2).
    np.testing.assert_allclose(
        base.logsnr(t), -2 * np.log(np.tan(np.pi * INTERIOR / 2)), rtol=1e-9, atol=1e-12
    )
    no_offset = schedules.get("cosine", s=0.0)
    np.testing.assert_allclose(base.logsnr(t), no_offset.logsnr(t), rtol=1e-9, atol=1e-9)


def test_edm_uniform_t_is_karras_discretisation(x64):
    sched = schedules.get("edm")
    n = 18
    i = np.arange(n)
    # Karras et al. 2022, Eq. 5, listed from sigma_max down.
    karras = (80 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(sched.sigma(jnp.linspace(1.0, 0.0, n)), karras, rtol=1e-12)


def test_ve_and_flow_parameters(x64):
    ve = schedules.get("ve", sigma_min=0.01, sigma_max=50.0)
    np.testing.assert_allclose(ve.sigma(jnp.asarray([0.0, 0.5, 1.0])), [0.01, math.sqrt(0.5), 50.0])
    flow = schedules.get("rectified_flow", shift=3.0)
    t = 0.4
    shifted = 3 * t / (1 + 2 * t)
    assert float(flow.sigma(t)) == pytest.approx(shifted)
    assert float(flow.alpha(t)) == pytest.approx(1 - shifted)
    assert float(flow.t_from_logsnr(flow.logsnr(t))) == pytest.approx(t)


def test_sigmoid_matches_chen_2023(x64):
    sched = schedules.get("sigmoid", start=-3.0, end=3.0, tau=0.7)
    t = INTERIOR
    sig = lambda v: 1 / (1 + np.exp(-v))
    v_start, v_end = sig(-3 / 0.7), sig(3 / 0.7)
    expected = (v_end - sig((t * 6 - 3) / 0.7)) / (v_end - v_start)
    np.testing.assert_allclose(np.asarray(sched.alpha(jnp.asarray(t))) ** 2, expected, rtol=1e-10)


def test_schedules_are_hashable_static_arguments():
    a, b = schedules.get("cosine"), schedules.get("cosine")
    assert a == b and hash(a) == hash(b)
    assert schedules.get("edm", sigma_max=10.0) != schedules.get("edm")


def test_bad_names_and_parameters():
    with pytest.raises(ValueError, match="unknown schedule 'cosin'.*choose one of"):
        schedules.get("cosin")
    with pytest.raises(ValueError, match="unknown parameter.*'sigma_max'.*accepts"):
        schedules.get("cosine", sigma_max=1.0)
    with pytest.raises(ValueError, match="zero_terminal"):
        schedules.get("edm", zero_terminal_snr=True)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        schedules.get("ve", sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="beta_start < beta_end"):
        schedules.get("ddpm_linear", beta_start=0.1, beta_end=0.01)


def test_discrete_schedule_slope_at_the_ends_of_time(x64):
    """log alpha-bar is piecewise linear in t; at t = 0 and t = 1 its derivative is the slope of
    the first and last interval, in full (a clamp must not halve it there)."""
    schedule = schedules.DiscreteVP()
    table = schedule.log_alpha_bar_table()
    slope = jax.grad(lambda t: schedule._log_alpha_bar(t))
    big_t = schedule.num_timesteps
    np.testing.assert_allclose(slope(0.0), (table[1] - table[0]) * big_t, rtol=1e-9)
    np.testing.assert_allclose(slope(1.0), (table[-1] - table[-2]) * big_t, rtol=1e-9)
    np.testing.assert_allclose(slope(0.5005), (table[501] - table[500]) * big_t, rtol=1e-9)
    assert float(slope(1.5)) == 0.0 and float(slope(-0.5)) == 0.0  # clamped beyond
