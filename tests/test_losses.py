"""Training losses: finiteness everywhere, the analytic minimum, weight closed forms, time sampling."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import analytic, losses, schedules
from diffusion_jax import parameterization as P


def _linear_model(params, x_in, noise_input, cond, key):
    shape = (-1,) + (1,) * (x_in.ndim - 1)
    return params["w"] * x_in + params["b"] * jnp.reshape(noise_input, shape)


def _fixed_times(values):
    values = jnp.asarray(values)

    def draw(key, batch_size, dtype):
        return jnp.resize(values, (batch_size,)).astype(dtype)

    return draw


ENDS = [0.0, 1e-6, 1e-3, 0.5, 1 - 1e-3, 1 - 1e-6, 1.0]


LOSS_SCHEDULES = [schedules.get(name) for name in sorted(schedules.SCHEDULES)] + [
    schedules.get("scaled_linear", zero_terminal_snr=True)
]


@pytest.mark.parametrize(
    "schedule", LOSS_SCHEDULES,
    ids=[s.name + ("_zero_snr" if getattr(s, "zero_terminal_snr", False) else "")
         for s in LOSS_SCHEDULES],
)
@pytest.mark.parametrize("target", P.TARGETS)
def test_finite_loss_and_gradients_at_both_ends(schedule, target):
    params = {"w": jnp.float32(0.3), "b": jnp.float32(0.1)}
    batch = {"x": jax.random.normal(jax.random.key(0), (len(ENDS), 4, 4, 2), jnp.float32)}
    for weighting in losses.WEIGHTINGS:
        loss_fn = losses.make_loss_fn(
            _linear_model,
            schedule=schedule,
            parameterization=target,
            time_sampling=_fixed_times(ENDS),
            weighting=weighting,
        )
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch, jax.random.key(1)
        )
        label = f"{schedule.name}/{target}/{weighting}"
        assert np.all(np.isfinite(aux["loss_per_example"])), (label, aux["loss_per_example"])
        assert np.isfinite(loss), label
        assert all(np.isfinite(g) for g in jax.tree_util.tree_leaves(grads)), (label, grads)


@pytest.mark.parametrize("time_sampling", losses.TIME_SAMPLING)
def test_every_time_sampling_runs_in_the_loss(time_sampling):
    loss_fn = losses.make_loss_fn(
        _linear_model, schedule="edm", parameterization="edm", time_sampling=time_sampling,
        weighting="edm",
    )
    params = {"w": jnp.float32(0.3), "b": jnp.float32(0.1)}
    batch = {"x": jnp.ones((16, 3), jnp.float32)}
    loss, aux = jax.jit(loss_fn)(params, batch, jax.random.key(0))
    assert np.isfinite(loss)
    assert aux["t"].shape == (16,) and np.all((aux["t"] >= 0) & (aux["t"] <= 1))


def _exact_apply_fn(gaussian, schedule, par):
    """A 'network' that outputs the exact posterior mean, expressed in the target's space."""

    def apply_fn(params, x_in, noise_input, cond, key):
        if par.name == "edm":
            t = schedule.t_from_logsnr(-8.0 * noise_input)
        else:
            t = noise_input
        alpha = P.broadcast_to(schedule.alpha(t), x_in)
        sigma = P.broadcast_to(schedule.sigma(t), x_in)
        if par.name == "edm":
            c_in, _, _ = par.edm_coefficients(alpha, sigma)
            x_t = x_in / c_in
        else:
            x_t = x_in
        x0_hat = gaussian.posterior_mean(x_t, alpha, sigma)
        return par.from_x0(x0_hat, x_t, alpha, sigma) + params["shift"]

    return apply_fn


CASES = [
    ("eps", "cosine", "mse"),
    ("x0", "ddpm_linear", "mse"),
    ("v", "cosine", "min_snr"),
    ("flow", "rectified_flow", "mse"),
    ("eps", "scaled_linear", "snr"),
    ("edm", "edm", "edm"),
    ("v", "shifted_cosine", "sigmoid"),
]


@pytest.mark.parametrize("target,schedule,weighting", CASES)
def test_exact_denoiser_attains_the_analytic_minimum(x64, target, schedule, weighting):
    """E_t[w(t) * mean_d Var(x0_d | x_t)] is the least achievable loss; the exact denoiser
    reaches it (Monte Carlo within 4 standard errors) and a perturbed one does not."""
    dim, batch = 64, 16384
    rng = np.random.default_rng(0)
    gaussian = analytic.DiagonalGaussian(rng.normal(size=dim) * 0.5, rng.uniform(0.05, 1.0, dim))
    sched = schedules.get(schedule)
    par = P.get(target)
    loss_fn = losses.make_loss_fn(
        _exact_apply_fn(gaussian, sched, par), schedule=sched, parameterization=par,
        time_sampling="stratified", weighting=weighting,
    )
    x0 = gaussian.sample(jax.random.key(1), batch)
    run = jax.jit(loss_fn)
    loss, aux = run({"shift": 0.0}, {"x": x0}, jax.random.key(2))
    stderr = float(np.std(aux["loss_per_example"]) / np.sqrt(batch))

    # Analytic value: midpoint rule over t (stratified sampling is uniform in t).
    t = (np.arange(200_000) + 0.5) / 200_000
    tt = jnp.asarray(t)
    alpha, sigma, logsnr = sched.alpha(tt), sched.sigma(tt), sched.logsnr(tt)
    post_var = jnp.mean(gaussian.posterior_var(alpha[:, None], sigma[:, None]), axis=1)
    ratio = jnp.exp(par.log_mse_ratio(jnp.clip(logsnr, -40, 40)))
    factor = losses.loss_weight(logsnr, weighting, par)
    expected = float(jnp.mean(factor * ratio * post_var))
    assert abs(float(loss) - expected) < 4 * stderr, (float(loss), expected, stderr)

    # Same data, times and noise with a perturbed denoiser: the paired difference is positive.
    _, worse = run({"shift": 0.05}, {"x": x0}, jax.random.key(2))
    diff = np.asarray(worse["loss_per_example"] - aux["loss_per_example"])
    assert diff.mean() > 4 * diff.std() / np.sqrt(batch)


def test_weights_match_their_papers(x64):
    logsnr = jnp.linspace(-8.0, 8.0, 33)
    snr = jnp.exp(logsnr)
    gamma = 5.0
    w = functools.partial(losses.loss_weight, logsnr)
    # Hang et al. 2023, Eq. 4 and its per-target forms.
    np.testing.assert_allclose(w("min_snr", "eps"), np.minimum(snr, gamma) / snr, rtol=1e-12)
    np.testing.assert_allclose(w("min_snr", "x0"), np.minimum(snr, gamma), rtol=1e-12)
    np.testing.assert_allclose(w("min_snr", "v"), np.minimum(snr, gamma) / (snr + 1), rtol=1e-12)
    # SNR weighting of the x0 error is the plain eps MSE (Ho et al.'s L_simple).
    np.testing.assert_allclose(w("snr", "eps"), 1.0, rtol=1e-12)
    np.testing.assert_allclose(w("mse", "v"), 1.0)
    # Karras et al. 2022: lambda(sigma) = 1 / c_out^2, so F's effective weight is 1.
    np.testing.assert_allclose(w("edm", "edm"), 1.0, rtol=1e-12)
    sigma = jnp.exp(-logsnr / 2)
    np.testing.assert_allclose(w("edm", "x0"), (sigma**2 + 0.25) / (sigma * 0.5) ** 2, rtol=1e-12)
    # Kingma & Gao 2023: sigmoid(b - logSNR) on the eps MSE.
    np.testing.assert_allclose(
        losses.loss_weight(logsnr, "sigmoid", "eps", bias=2.0), jax.nn.sigmoid(2.0 - logsnr),
        rtol=1e-12,
    )


def test_time_sampling_distributions():
    key = jax.random.key(0)
    n = 200_000
    t = losses.sample_time(key, n, "uniform")
    assert 0 <= float(t.min()) and float(t.max()) < 1 and abs(float(t.mean()) - 0.5) < 0.01
    strat = np.sort(np.asarray(losses.sample_time(key, 64, "stratified")))
    np.testing.assert_allclose(np.diff(strat), 1 / 64, atol=1e-5)
    anti = np.asarray(losses.sample_time(key, 10, "antithetic"))
    np.testing.assert_allclose(anti[:5] + anti[5:], 1.0, atol=1e-6)
    t = np.asarray(losses.sample_time(key, n, "logit_normal", mean=0.5, std=2.0))
    logit = np.log(t / (1 - t))
    assert abs(logit.mean() - 0.5) < 0.02 and abs(logit.std() - 2.0) < 0.02
    edm = schedules.get("edm")
    t = losses.sample_time(key, n, "edm_lognormal", schedule=edm)
    log_sigma = np.log(np.asarray(edm.sigma(t)))
    assert abs(log_sigma.mean() + 1.2) < 0.02 and abs(log_sigma.std() - 1.2) < 0.02


def test_bad_loss_configuration():
    with pytest.raises(ValueError, match="unknown weighting 'snr2'"):
        losses.make_loss_fn(_linear_model, schedule="cosine", weighting="snr2")
    with pytest.raises(ValueError, match="min_snr.*unknown parameter.*'gama'"):
        losses.make_loss_fn(_linear_model, schedule="cosine", weighting="min_snr",
                            weighting_params={"gama": 5})
    with pytest.raises(ValueError, match="unknown time sampling 'lognormal'"):
        losses.make_loss_fn(_linear_model, schedule="cosine", time_sampling="lognormal")
    loss_fn = losses.make_loss_fn(_linear_model, schedule="cosine")
    with pytest.raises(KeyError, match="no 'x' entry"):
        loss_fn({"w": 1.0, "b": 0.0}, {"image": jnp.ones((2, 3))}, jax.random.key(0))


def test_bfloat16_data_gives_a_float32_loss():
    loss_fn = losses.make_loss_fn(_linear_model, schedule="cosine", parameterization="v",
                                  weighting="min_snr")
    params = {"w": jnp.float32(0.3), "b": jnp.float32(0.1)}
    x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3))
    loss16, aux = loss_fn(params, {"x": x.astype(jnp.bfloat16)}, jax.random.key(1))
    loss32, _ = loss_fn(params, {"x": x.astype(jnp.bfloat16).astype(jnp.float32)},
                        jax.random.key(1))
    assert loss16.dtype == jnp.float32 and aux["t"].dtype == jnp.float32
    np.testing.assert_allclose(loss16, loss32, rtol=1e-6)
