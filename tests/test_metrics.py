"""Sample-set metrics against closed forms: Fréchet distance, streaming feature statistics,
precision/recall, and probability-flow likelihood against the exact Gaussian density."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import analytic, likelihood, metrics, schedules


def _random_covariance(rng, dim):
    a = rng.standard_normal((dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    dim = 6
    m1, m2 = rng.standard_normal(dim), rng.standard_normal(dim)
    # Diagonal covariances: |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = rng.uniform(0.1, 3, dim), rng.uniform(0.1, 3, dim)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected,
                                                                                    rel=1e-12)
    # Full, non-commuting covariances: tr (C1 C2)^(1/2) is the sum of the square roots of the
    # (real, positive) eigenvalues of the non-symmetric product C1 C2.
    c1, c2 = _random_covariance(rng, dim), _random_covariance(rng, dim)
    cross = np.sum(np.sqrt(np.linalg.eigvals(c1 @ c2).real))
    expected = np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * cross
    assert metrics.frechet_distance(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-10)
    assert metrics.frechet_distance(m1, c1, m1, c1) == pytest.approx(0.0, abs=1e-10)
    # Singular covariances (fewer samples than dimensions) are fine.
    low_rank = np.outer(m1, m1)
    assert np.isfinite(metrics.frechet_distance(m1, low_rank, m2, c2))
    with pytest.raises(ValueError, match="shapes do not match"):
        metrics.frechet_distance(m1, c1, m2[:3], c2[:3, :3])


def test_frechet_distance_of_samples():
    rng = np.random.default_rng(1)
    dim, n = 8, 20_000
    c1, c2 = _random_covariance(rng, dim), _random_covariance(rng, dim)
    m1, m2 = np.zeros(dim), np.full(dim, 0.5)
    x = rng.multivariate_normal(m1, c1, n)
    y = rng.multivariate_normal(m2, c2, n)
    sx = metrics.FeatureStatistics(dim).update(x)
    sy = metrics.FeatureStatistics(dim).update(y)
    assert metrics.frechet_distance(sx, sx) == pytest.approx(0.0, abs=1e-9)
    exact = metrics.frechet_distance(m1, c1, m2, c2)
    assert metrics.frechet_distance(sx, sy) == pytest.approx(exact, rel=0.03)


def test_streaming_statistics_equal_one_pass_statistics():
    rng = np.random.default_rng(2)
    # A large common offset: naive sums of x and x x^T would lose most digits here.
    x = 1e4 + rng.standard_normal((1000, 5)) * np.array([1, 2, 3, 0.5, 0.01])
    stats = metrics.FeatureStatistics(5)
    for start, stop in [(0, 1), (1, 17), (17, 500), (500, 500), (500, 1000)]:
        stats.update(x[start:stop])
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(stats.covariance, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-10)
    # Shards from different hosts merge to the same statistics, and survive a save/load.
    a = metrics.FeatureStatistics(5).update(x[:300])
    b = metrics.FeatureStatistics.from_arrays(
        metrics.FeatureStatistics(5).update(x[300:]).to_arrays())
    merged = a.merge(b)
    assert merged.count == 1000
    np.testing.assert_allclose(merged.covariance, stats.covariance, rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.FeatureStatistics(3).update(np.ones((1, 3))).covariance


def test_precision_and_recall():
    rng = np.random.default_rng(3)
    real = np.concatenate([rng.standard_normal((500, 2)) + [-4, 0],
                           rng.standard_normal((500, 2)) + [4, 0]])
    same = metrics.precision_recall(real, real)
    assert same == {"precision": 1.0, "recall": 1.0}
    fresh = np.concatenate([rng.standard_normal((500, 2)) + [-4, 0],
                            rng.standard_normal((500, 2)) + [4, 0]])
    good = metrics.precision_recall(real, fresh)
    assert good["precision"] > 0.9 and good["recall"] > 0.9
    # Mode collapse: every sample realistic, half the data not covered.
    collapsed = rng.standard_normal((1000, 2)) + [-4, 0]
    result = metrics.precision_recall(real, collapsed)
    assert result["precision"] > 0.9
    assert 0.4 < result["recall"] < 0.6
    # Shifted off the data: neither realistic nor covering.
    shifted = metrics.precision_recall(real, fresh + [0, 10])
    assert shifted["precision"] < 0.05 and shifted["recall"] < 0.05


def _gaussian_log_density(x, mean, var):
    return np.sum(-0.5 * (x - mean) ** 2 / var - 0.5 * np.log(2 * np.pi * var), axis=-1)


def _likelihood_error(schedule, data, x, num_steps, t_min=1e-3):
    result = likelihood.log_likelihood(data.denoiser(schedule), x, schedule=schedule,
                                       num_steps=num_steps, t_min=t_min, divergence="exact")
    assert result.nfe == 4 * num_steps
    # The exact answer: the marginal density at t_min, with the prior's log-density at the
    # exact end point standing in for the marginal's there (the two differ unless
    # alpha(t_end) = 0; the estimate uses the prior, as sampling does).
    t_end = float(schedule.t_from_logsnr(likelihood.ode_logsnr_grid(schedule, num_steps,
                                                                    t_min)[-1]))
    a0, s0 = float(schedule.alpha(t_min)), float(schedule.sigma(t_min))
    a1, s1 = float(schedule.alpha(t_end)), float(schedule.sigma(t_end))
    x_end = np.asarray(data.ode_solution(schedule, jnp.asarray(x), t_min, t_end))
    expected = (_gaussian_log_density(x, a0 * data.mean, a0 ** 2 * data.var + s0 ** 2)
                - _gaussian_log_density(x_end, a1 * data.mean, a1 ** 2 * data.var + s1 ** 2)
                + _gaussian_log_density(x_end, 0.0, a1 ** 2 + s1 ** 2))
    return np.abs(np.asarray(result.log_likelihood) - expected).max()


@pytest.mark.parametrize("name", ["cosine", "ddpm_linear", "edm", "rectified_flow", "ve"])
def test_likelihood_matches_the_gaussian_density(x64, name):
    """RK4 in log-SNR converges with order 4 to the exact log-density, also for DDPM's
    piecewise (1000-step table) schedule."""
    schedule = schedules.get(name)
    data = analytic.DiagonalGaussian(mean=np.array([0.5, -1.0, 0.2]),
                                     var=np.array([0.3, 1.5, 0.05]))
    x = np.asarray(data.sample(jax.random.key(0), 32), np.float64)
    coarse, fine = _likelihood_error(schedule, data, x, 32), _likelihood_error(schedule, data, x, 128)
    assert fine < 3e-5  # nats, for 3 dimensions
    assert coarse / fine > 4 ** 4 / 2  # fourth order: 4x the steps, ~256x smaller error


def test_hutchinson_estimate_is_unbiased(x64):
    schedule = schedules.get("cosine")
    data = analytic.DiagonalGaussian(mean=np.zeros(16), var=np.linspace(0.1, 2.0, 16))
    x = np.asarray(data.sample(jax.random.key(1), 8), np.float64)
    exact = likelihood.log_likelihood(data.denoiser(schedule), x, schedule=schedule,
                                      num_steps=32, divergence="exact").log_likelihood
    estimate = likelihood.log_likelihood(data.denoiser(schedule), x, schedule=schedule,
                                         num_steps=32, divergence="hutchinson", num_probes=64,
                                         key=jax.random.key(2)).log_likelihood
    error = np.asarray(estimate - exact)
    # Each example's estimate averages 64 probes; the errors are zero-mean and small.
    assert abs(error.mean()) < 3 * error.std() / math.sqrt(len(error)) + 1e-6
    assert np.abs(error).max() < 0.5
    with pytest.raises(ValueError, match="pass key"):
        likelihood.log_likelihood(data.denoiser(schedule), x, schedule=schedule)


def test_bits_per_dim():
    # A uniform density over [-1, 1]^D: 256 equally likely levels per dimension, 8 bits.
    dim = 3 * 32 * 32
    np.testing.assert_allclose(likelihood.bits_per_dim(dim * math.log(0.5), dim), 8.0,
                               rtol=1e-6)
