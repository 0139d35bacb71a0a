"""Prediction targets: exact round trips, error ratios, EDM preconditioning, denoise_fn."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import parameterization as P
from diffusion_jax import schedules

TARGETS = P.TARGETS


def _setup(name, t, seed=0, shape=(5, 3, 4)):
    sched = schedules.get(name)
    k1, k2 = jax.random.split(jax.random.key(seed))
    x0 = jax.random.normal(k1, shape, jnp.float64)
    eps = jax.random.normal(k2, shape, jnp.float64)
    t = jnp.full(shape[:1], t, jnp.float64)
    alpha = P.broadcast_to(sched.alpha(t), x0)
    sigma = P.broadcast_to(sched.sigma(t), x0)
    return sched, x0, eps, alpha * x0 + sigma * eps, alpha, sigma, t


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", ["ddpm_linear", "cosine", "edm", "rectified_flow", "ve"])
@pytest.mark.parametrize("t", [0.02, 0.5, 0.97])
def test_target_round_trip(x64, target, name, t):
    par = P.get(target)
    _, x0, eps, x_t, alpha, sigma, _ = _setup(name, t)
    out = par.target(x0, eps, x_t, alpha, sigma)
    np.testing.assert_allclose(par.to_x0(out, x_t, alpha, sigma), x0, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(par.from_x0(x0, x_t, alpha, sigma), out, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("source", TARGETS)
@pytest.mark.parametrize("target", TARGETS)
def test_convert_between_targets(x64, source, target):
    _, x0, eps, x_t, alpha, sigma, _ = _setup("cosine", 0.4)
    src = P.get(source).target(x0, eps, x_t, alpha, sigma)
    expected = P.get(target).target(x0, eps, x_t, alpha, sigma)
    got = P.convert(src, source=source, target=target, x_t=x_t, alpha=alpha, sigma=sigma)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


def test_closed_forms_of_v_and_flow(x64):
    _, x0, eps, x_t, alpha, sigma, _ = _setup("ddpm_linear", 0.3)
    # Salimans & Ho 2022 for VP: v = alpha eps - sigma x0.
    np.testing.assert_allclose(P.get("v").target(x0, eps, x_t, alpha, sigma), alpha * eps - sigma * x0)
    np.testing.assert_allclose(P.get("flow").target(x0, eps, x_t, alpha, sigma), eps - x0)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("t", [0.05, 0.5, 0.9])
def test_log_mse_ratio_matches_finite_perturbation(x64, target, t):
    """The ratio (target error)^2 / (x0 error)^2 at fixed x_t, measured on a perturbation."""
    par = P.get(target)
    sched, x0, eps, x_t, alpha, sigma, tt = _setup("edm" if target == "edm" else "cosine", t)
    out = par.target(x0, eps, x_t, alpha, sigma)
    delta = 1e-3 * jax.random.normal(jax.random.key(7), out.shape, out.dtype)
    d_x0 = par.to_x0(out + delta, x_t, alpha, sigma) - par.to_x0(out, x_t, alpha, sigma)
    ratio = jnp.sum(delta**2, axis=(1, 2)) / jnp.sum(d_x0**2, axis=(1, 2))
    np.testing.assert_allclose(
        jnp.log(ratio), par.log_mse_ratio(sched.logsnr(tt)), rtol=1e-8, atol=1e-9
    )


def test_edm_preconditioning_matches_karras_table_1(x64):
    par = P.get("edm", sigma_data=0.5)
    sigma = jnp.asarray([0.002, 0.3, 2.0, 80.0])
    c_in, c_skip, c_out = par.edm_coefficients(jnp.ones_like(sigma), sigma)
    sd = 0.5
    np.testing.assert_allclose(c_skip, sd**2 / (sigma**2 + sd**2), rtol=1e-12)
    np.testing.assert_allclose(c_out, sigma * sd / np.sqrt(sigma**2 + sd**2), rtol=1e-12)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(sigma**2 + sd**2), rtol=1e-12)
    x = jnp.ones((4, 2))
    _, c_noise = par.network_inputs(x, None, jnp.ones(4), sigma, -2 * jnp.log(sigma))
    np.testing.assert_allclose(c_noise, np.log(sigma) / 4, rtol=1e-12)


@pytest.mark.parametrize("target", TARGETS)
def test_conversions_finite_at_the_ends(target):
    """float32, t = 0 (sigma = 0) and t = 1 (alpha = 0 on cosine): nothing is NaN."""
    par = P.get(target)
    sched = schedules.get("cosine")
    x = jnp.ones((2, 3), jnp.float32)
    for t in (0.0, 1.0):
        tt = jnp.full((2,), t, jnp.float32)
        alpha, sigma = P.broadcast_to(sched.alpha(tt), x), P.broadcast_to(sched.sigma(tt), x)
        assert np.all(np.isfinite(par.to_x0(x, x, alpha, sigma)))
        assert np.all(np.isfinite(par.target(x, x, x, alpha, sigma)))
        assert np.all(np.isfinite(par.network_inputs(x, tt, sched.alpha(tt), sched.sigma(tt),
                                                     sched.logsnr(tt))[0]))


@pytest.mark.parametrize("target", TARGETS)
def test_make_denoise_fn_recovers_x0_from_an_ideal_network(x64, target):
    par = P.get(target)
    sched, x0, eps, x_t, alpha, sigma, t = _setup("ddpm_linear", 0.6)
    seen = {}

    def apply_fn(params, x_in, noise_input, label):
        seen["args"] = (x_in, noise_input, label)
        return params["out"]

    out = par.target(x0, eps, x_t, alpha, sigma)
    denoise = P.make_denoise_fn(functools.partial(apply_fn, {"out": out}), sched, par)
    np.testing.assert_allclose(denoise(x_t, t, label=3), x0, rtol=1e-9, atol=1e-9)
    x_in, noise_input, label = seen["args"]
    assert label == 3
    if target == "edm":
        np.testing.assert_allclose(noise_input, -sched.logsnr(t) / 8)
    else:
        np.testing.assert_allclose(noise_input, t)
        np.testing.assert_allclose(x_in, x_t)


def test_bad_target():
    with pytest.raises(ValueError, match="unknown prediction target 'noise'"):
        P.get("noise")
    with pytest.raises(ValueError, match="unknown parameter"):
        P.get("eps", gamma=2)


def test_eps_prediction_is_refused_at_zero_terminal_snr():
    apply_fn = lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError, match="eps-predicting network cannot denoise.*alpha = 0"):
        P.make_denoise_fn(apply_fn, "cosine", "eps")
    P.make_denoise_fn(apply_fn, "cosine", "v")
    P.make_denoise_fn(apply_fn, schedules.Cosine(t_max=0.999), "eps")
    P.make_denoise_fn(apply_fn, "ddpm_linear", "eps")
