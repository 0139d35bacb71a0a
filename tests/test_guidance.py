"""Classifier-free guidance: limits, the combination formula, one batched call, rescale, negatives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import analytic, guidance, samplers, schedules


def _toy_model(calls=None):
    """x0_hat depends on the condition (a label embedding) and on x_t, t."""
    table = jax.random.normal(jax.random.key(0), (11, 6))

    def model_fn(x_t, t, cond):
        if calls is not None:
            calls.append((x_t.shape, t.shape, jax.tree_util.tree_map(jnp.shape, cond)))
        return 0.5 * x_t * (1 - t)[:, None] + table[cond["label"]]

    return model_fn


def _inputs(batch=4):
    x = jax.random.normal(jax.random.key(1), (batch, 6))
    t = jnp.linspace(0.1, 0.9, batch)
    cond = {"label": jnp.arange(batch) % 10}
    uncond = {"label": jnp.full((batch,), 10)}  # the null label
    return x, t, cond, uncond


def test_scale_one_is_conditional_and_zero_is_unconditional():
    model = _toy_model()
    x, t, cond, uncond = _inputs()
    at_one = guidance.classifier_free_guidance(model, cond=cond, uncond=uncond, scale=1.0)
    at_zero = guidance.classifier_free_guidance(model, cond=cond, uncond=uncond, scale=0.0)
    np.testing.assert_array_equal(at_one(x, t), model(x, t, cond))
    np.testing.assert_allclose(at_zero(x, t), model(x, t, uncond), rtol=1e-6, atol=1e-6)


def test_general_scale_is_ho_and_salimans_combination():
    model = _toy_model()
    x, t, cond, uncond = _inputs()
    for scale in (0.5, 3.0, 7.5):
        guided = guidance.classifier_free_guidance(model, cond=cond, uncond=uncond, scale=scale)
        c, u = model(x, t, cond), model(x, t, uncond)
        np.testing.assert_allclose(guided(x, t), u + scale * (c - u), rtol=1e-5, atol=1e-5)


def test_one_batched_model_call_per_evaluation():
    calls = []
    x, t, cond, uncond = _inputs(batch=4)
    guided = guidance.classifier_free_guidance(_toy_model(calls), cond=cond, uncond=uncond,
                                               scale=4.0)
    guided(x, t)
    assert len(calls) == 1
    assert calls[0] == ((8, 6), (8,), {"label": (8,)})


def test_one_model_call_per_sampler_step():
    """Inside a sampler: as many model calls as the sampler's NFE, each on the doubled batch."""
    calls = []
    x, _, cond, uncond = _inputs(batch=4)

    def model(x_t, t, c):
        jax.experimental.io_callback(lambda b: calls.append(int(b)), None, x_t.shape[0],
                                     ordered=True)
        return _toy_model()(x_t, t, c)

    guided = guidance.classifier_free_guidance(model, cond=cond, uncond=uncond, scale=2.0)
    result = samplers.sample(guided, x, schedule="cosine", method="dpmpp_2m", num_steps=5)
    jax.effects_barrier()
    assert calls == [8] * result.nfe


def test_negative_condition_replaces_the_unconditional_branch():
    model = _toy_model()
    x, t, cond, uncond = _inputs()
    negative = {"label": jnp.full((4,), 7)}
    guided = guidance.classifier_free_guidance(model, cond=cond, uncond=uncond, scale=3.0,
                                               negative=negative)
    c, n = model(x, t, cond), model(x, t, negative)
    np.testing.assert_allclose(guided(x, t), n + 3.0 * (c - n), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("space", ["x0", "eps", "v"])
def test_guidance_rescale(x64, space):
    """phi = 1 gives the conditional prediction's per-example std in the chosen space (Lin et al.
    2023, Eq. 15); phi = 0 is plain guidance; in between, a linear blend."""
    from diffusion_jax import parameterization as P

    sched = schedules.get("cosine")
    model = _toy_model()
    x, t, cond, uncond = _inputs()
    x, t = x.astype(jnp.float64), t.astype(jnp.float64)
    make = lambda phi: guidance.classifier_free_guidance(  # noqa: E731
        model, cond=cond, uncond=uncond, scale=6.0, rescale=phi, rescale_space=space,
        schedule=sched)
    plain, full, half = make(0.0)(x, t), make(1.0)(x, t), make(0.5)(x, t)
    alpha, sigma = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
    to_space = lambda x0: P.get(space).from_x0(x0, x, alpha, sigma)  # noqa: E731
    np.testing.assert_allclose(
        jnp.std(to_space(full), axis=1), jnp.std(to_space(model(x, t, cond)), axis=1), rtol=1e-9
    )
    np.testing.assert_allclose(to_space(half), 0.5 * (to_space(full) + to_space(plain)),
                               rtol=1e-9, atol=1e-9)
    assert not np.allclose(plain, full)


def test_guidance_steers_an_exact_mixture_towards_its_class():
    """With the exact class-conditional denoisers of a two-class mixture, higher scale puts more
    samples on the requested class's mode."""
    means = np.array([[-2.0, 0.0], [2.0, 0.0]])
    sched = schedules.get("cosine")
    per_class = [analytic.GaussianMixture(np.array([1.0]), means[i:i + 1], np.array([0.3]))
                 for i in range(2)]
    both = analytic.GaussianMixture(np.array([0.5, 0.5]), means, np.array([0.3, 0.3]))
    denoisers = [m.denoiser(sched) for m in per_class] + [both.denoiser(sched)]

    def model_fn(x_t, t, cond):
        outs = jnp.stack([d(x_t, t) for d in denoisers])  # [3, B, 2]
        return jnp.take_along_axis(outs, cond["label"][None, :, None], axis=0)[0]

    num = 2000
    noise = jax.random.normal(jax.random.key(3), (num, 2))
    cond = {"label": jnp.zeros(num, jnp.int32)}
    uncond = {"label": jnp.full(num, 2, jnp.int32)}
    fractions = []
    for scale in (0.0, 1.0):
        guided = guidance.classifier_free_guidance(model_fn, cond=cond, uncond=uncond,
                                                   scale=scale)
        out = samplers.sample(guided, noise, schedule=sched, method="dpmpp_2m", num_steps=30)
        fractions.append(float(np.mean(both.assign(out.samples) == 0)))
    assert abs(fractions[0] - 0.5) < 0.05  # unconditional: both modes
    assert fractions[1] > 0.99  # conditional: class 0 only


def test_bad_guidance_arguments():
    model = _toy_model()
    _, _, cond, uncond = _inputs()
    with pytest.raises(ValueError, match="rescale must be in"):
        guidance.classifier_free_guidance(model, cond=cond, uncond=uncond, scale=2, rescale=2)
    with pytest.raises(ValueError, match="needs the schedule"):
        guidance.classifier_free_guidance(model, cond=cond, uncond=uncond, scale=2, rescale=0.5,
                                          rescale_space="eps")
    with pytest.raises(ValueError, match="same structure"):
        guidance.classifier_free_guidance(model, cond=cond, uncond=jnp.zeros(4), scale=2)


def test_rescale_in_eps_space_at_zero_terminal_snr(x64):
    """At alpha = 0 the eps of a prediction no longer determines x0: rescaling in eps space keeps
    the plain guided estimate there instead of collapsing it to zero."""
    sched = schedules.get("scaled_linear", zero_terminal_snr=True)
    model = _toy_model()
    x, _, cond, uncond = _inputs()
    x = x.astype(jnp.float64)
    t = jnp.ones(4)
    plain = guidance.classifier_free_guidance(model, cond=cond, uncond=uncond, scale=5.0)(x, t)
    rescaled = guidance.classifier_free_guidance(
        model, cond=cond, uncond=uncond, scale=5.0, rescale=0.7, rescale_space="eps",
        schedule=sched)(x, t)
    np.testing.assert_allclose(rescaled, plain)
    assert float(jnp.max(jnp.abs(plain))) > 1.0
