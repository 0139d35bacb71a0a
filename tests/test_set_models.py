"""Set denoisers (EGNN, point transformer): symmetries, masks, the centred loss and sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import losses, parameterization, samplers, schedules, set_runs
from diffusion_jax.models.egnn import EGNN, center_positions
from diffusion_jax.models.point_transformer import PointTransformer

B, N, F = 3, 9, 5


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, N, 3 + F)).astype(np.float32)
    mask = np.ones((B, N), np.float32)
    mask[1, 6:] = 0.0
    mask[2, 4:] = 0.0
    x = np.asarray(center_positions(jnp.asarray(x), mask))
    return x, mask, jnp.array([0.2, 0.5, 0.9]), jnp.array([0, 2, 1])


def _perturbed(model, x, mask, t, labels, seed=1):
    """Parameters with every leaf moved off its (partly zero) initial value."""
    params = model.init(jax.random.key(0), x, t, labels, node_mask=mask)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [a + 0.2 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


def _orthogonal(seed, reflect):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if (np.linalg.det(q) < 0) != reflect:
        q[:, 0] = -q[:, 0]
    return q.astype(np.float32)


MODELS = {
    "egnn": lambda: EGNN(hidden=32, depth=3, num_classes=3),
    "point_transformer": lambda: PointTransformer(hidden=32, depth=2, num_heads=4,
                                                  num_classes=3),
}


@pytest.mark.parametrize("reflect", [False, True])
def test_egnn_is_e3_equivariant(reflect):
    x, mask, t, labels = _inputs()
    model = MODELS["egnn"]()
    params = _perturbed(model, x, mask, t, labels)
    out = np.asarray(model.apply(params, x, t, labels, node_mask=mask))
    q = _orthogonal(3, reflect)
    shift = np.array([1.5, -2.0, 0.7], np.float32)
    moved = x.copy()
    moved[..., :3] = (x[..., :3] @ q.T + shift) * mask[..., None]
    out_moved = np.asarray(model.apply(params, moved, t, labels, node_mask=mask))
    scale = np.abs(out).max()
    assert scale > 0.1  # the network does something
    position_error = np.abs(out_moved[..., :3] - out[..., :3] @ q.T).max()
    feature_error = np.abs(out_moved[..., 3:] - out[..., 3:]).max()
    assert position_error < 2e-6 * scale, position_error
    assert feature_error < 2e-6 * scale, feature_error


@pytest.mark.parametrize("name", sorted(MODELS))
def test_permuting_members_permutes_the_output(name):
    x, mask, t, labels = _inputs()
    model = MODELS[name]()
    params = _perturbed(model, x, mask, t, labels)
    out = np.asarray(model.apply(params, x, t, labels, node_mask=mask))
    order = np.random.default_rng(5).permutation(N)
    out_permuted = np.asarray(model.apply(params, x[:, order], t, labels,
                                          node_mask=mask[:, order]))
    assert np.abs(out).max() > 0.1
    assert np.abs(out_permuted - out[:, order]).max() < 2e-6 * np.abs(out).max()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_absent_members_have_no_influence(name):
    x, mask, t, labels = _inputs()
    model = MODELS[name]()
    params = _perturbed(model, x, mask, t, labels)
    out = np.asarray(model.apply(params, x, t, labels, node_mask=mask))
    junk = x.copy()
    junk[mask == 0] = np.random.default_rng(7).normal(size=junk[mask == 0].shape) * 100.0
    out_junk = np.asarray(model.apply(params, junk, t, labels, node_mask=mask))
    np.testing.assert_array_equal(out_junk, out)
    assert np.all(out[mask == 0] == 0.0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_outputs_have_zero_centre_of_mass_and_ignore_translations(name):
    x, mask, t, labels = _inputs()
    model = MODELS[name]()
    params = _perturbed(model, x, mask, t, labels)
    out = np.asarray(model.apply(params, x, t, labels, node_mask=mask))
    centre = (out[..., :3] * mask[..., None]).sum(1) / mask.sum(1)[:, None]
    assert np.abs(centre).max() < 2e-7 * np.abs(out).max()  # float32 round-off of the mean
    shifted = x.copy()
    shifted[..., :3] += np.array([3.0, 1.0, -2.0], np.float32)
    out_shifted = np.asarray(model.apply(params, shifted, t, labels, node_mask=mask))
    assert np.abs(out_shifted - out).max() < 5e-6 * np.abs(out).max()


def test_labels_change_the_output():
    x, mask, t, labels = _inputs()
    for name in MODELS:
        model = MODELS[name]()
        params = _perturbed(model, x, mask, t, labels)
        a = model.apply(params, x, t, labels, node_mask=mask)
        b = model.apply(params, x, t, (labels + 1) % 3, node_mask=mask)
        assert np.abs(np.asarray(a - b)).max() > 1e-3, name


def test_center_positions_projects():
    x, mask, _, _ = _inputs()
    raw = np.random.default_rng(2).normal(size=x.shape).astype(np.float32) + 4.0
    projected = np.asarray(center_positions(jnp.asarray(raw), mask))
    assert np.all(projected[mask == 0] == 0.0)
    np.testing.assert_allclose(projected[..., 3:][mask > 0], raw[..., 3:][mask > 0])
    mean = (projected[..., :3] * mask[..., None]).sum(1) / mask.sum(1)[:, None]
    assert np.abs(mean).max() < 1e-6
    again = np.asarray(center_positions(jnp.asarray(projected), mask))
    np.testing.assert_allclose(again, projected, atol=1e-6)


def _identity_network(output):
    return lambda params, x_in, noise_input, cond, key: output(x_in, cond)


def test_masked_loss_counts_present_entries_only():
    x, mask, _, _ = _inputs()
    schedule = "cosine"
    apply = _identity_network(lambda x_in, cond: jnp.zeros_like(x_in))
    loss_fn = losses.make_loss_fn(apply, schedule=schedule, parameterization="eps",
                                  **{"mask_key": "node_mask", "project": set_runs.project})
    batch = {"x": jnp.asarray(x), "node_mask": jnp.asarray(mask)}
    batch_out, draws = loss_fn.draw(batch, jax.random.key(3))
    eps = np.asarray(draws["eps"])
    # The drawn noise lies in the subspace: zero centre of mass, absent members zero.
    assert np.all(eps[mask == 0] == 0.0)
    assert np.abs((eps[..., :3] * mask[..., None]).sum(1)).max() < 1e-5
    _, aux = loss_fn.compute(None, batch_out, draws)
    # A zero output's MSE against eps over present entries only.
    expected = [np.mean(eps[i][mask[i] > 0] ** 2) for i in range(B)]
    np.testing.assert_allclose(np.asarray(aux["mse_per_example"]), expected, rtol=1e-5)
    unmasked = losses.make_loss_fn(apply, schedule=schedule, parameterization="eps")
    _, aux_plain = unmasked.compute(None, batch_out, draws)
    assert not np.allclose(np.asarray(aux_plain["mse_per_example"])[1:], expected[1:])


def _projected_sampling(method, x, mask, labels, junk_seed=None, **options):
    """Samples of a perturbed EGNN by ``method`` from projected noise, and from the same noise
    plus a component outside the subspace (a shift of every position and junk in absent rows)."""
    model = MODELS["egnn"]()
    params = _perturbed(model, x, mask, jnp.zeros(B), labels)
    schedule = "ddpm_linear"
    network = lambda p, x_, t_, c: model.apply(p, x_, t_, c["label"], node_mask=c["node_mask"])
    denoise = parameterization.make_denoise_fn(jax.tree_util.Partial(network, params),
                                               schedule, "eps")
    denoise = set_runs.SetSampling.denoiser(denoise)
    cond = {"label": labels, "node_mask": jnp.asarray(mask)}
    fn = lambda x_, t_: denoise(x_, t_, cond)
    noise = set_runs.project(jax.random.normal(jax.random.key(4), x.shape), mask)
    outside = jnp.zeros_like(noise).at[..., :3].set(jnp.array([0.8, -1.1, 0.5]))
    outside = jnp.where(jnp.asarray(mask)[..., None] > 0, outside, jax.random.normal(
        jax.random.key(9), x.shape))
    run = lambda z: samplers.sample(fn, z, schedule=schedule, method=method, num_steps=8,
                                    key=jax.random.key(6), **options)
    return run(noise), run(noise + outside)


def _assert_same_projection(a, b, mask):
    projected = lambda s: np.asarray(set_runs.project(jnp.asarray(s), mask))
    scale = np.abs(projected(a)).max()
    assert np.isfinite(np.asarray(a)).all() and np.isfinite(np.asarray(b)).all()
    assert scale > 0.1
    assert np.abs(projected(b) - projected(a)).max() < 1e-4 * scale


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_a_state_outside_the_subspace_never_reaches_the_projected_samples(method):
    """A sampler's updates are linear, and the projected denoiser reads only the centred
    positions of present atoms: a component outside the subspace in the starting noise (as a
    stochastic step's fresh noise adds) leaves the projected samples unchanged, so the samplers
    need no change for centred diffusion."""
    x, mask, _, labels = _inputs()
    plain, moved = _projected_sampling(method, x, mask, labels)
    _assert_same_projection(plain.samples, moved.samples, mask)


@pytest.mark.slow  # every sampler compiles twice
@pytest.mark.parametrize("method", samplers.METHODS)
def test_every_sampler_keeps_the_projected_samples_of_any_start(method):
    x, mask, _, labels = _inputs()
    plain, moved = _projected_sampling(method, x, mask, labels)
    _assert_same_projection(plain.samples, moved.samples, mask)


def test_the_state_centre_of_mass_decays_with_the_noise_level():
    """With the denoiser's x0 estimate projected, DDIM's update scales the centre of mass of
    its state by sigma(s) / sigma(t) at each step (unprojected it would grow as 1 / alpha)."""
    x, mask, _, labels = _inputs()
    _, moved = _projected_sampling("ddim", x, mask, labels, return_trajectory=True)
    states = np.asarray(moved.trajectory)
    centres = (states[..., :3] * mask[..., None]).sum(2) / mask.sum(1)[None, :, None]
    sigma = np.asarray(schedules.get("ddpm_linear").sigma(jnp.asarray(moved.times)))
    expected = centres[0] * (sigma / sigma[0])[:, None, None]
    assert np.abs(centres[0]).max() > 0.5  # the shift is there at the start
    # (to float32 round-off of the projected estimate's mean, whose entries reach tens here)
    np.testing.assert_allclose(centres[:-1], expected[:-1], rtol=2e-3, atol=1e-4)
    # The end is the projected estimate: centred to round-off of its entries.
    assert np.abs(centres[-1]).max() < 2e-6 * np.abs(states[-1]).max()
