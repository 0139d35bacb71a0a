"""Training step: determinism and resumption, EMA, NaN detection, and a real fit on 2-D data."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import data, guidance, losses, metrics, parameterization, samplers, train
from diffusion_jax.models import MLP

SCHEDULE = "cosine"
TARGET = "v"


def _setup(num_classes=None, label_dropout=0.0, lr=2e-3, ema_decay=0.999, hidden=128):
    model = MLP(hidden=hidden, depth=3, num_classes=num_classes)
    optimizer = train.make_optimizer(lr, warmup_steps=100, grad_clip=1.0)
    apply_fn = train.network_apply_fn(model, num_classes=num_classes, label_dropout=label_dropout)
    loss_fn = losses.make_loss_fn(apply_fn, schedule=SCHEDULE, parameterization=TARGET)
    step = jax.jit(train.make_train_step(loss_fn, optimizer, ema_decay=ema_decay))
    state = train.create_train_state(model, optimizer, jnp.zeros((1, 2)), jax.random.key(0),
                                     with_labels=num_classes is not None)
    return model, step, state


@functools.lru_cache(maxsize=None)
def _toy_points(n=20_000):
    source = data.Toy2D("mixture", size=n, seed=0)
    records = [source[i] for i in range(n)]
    return (np.stack([r["x"] for r in records]), np.array([r["label"] for r in records]))


def _batches(batch_size, seed):
    points, labels = _toy_points()
    rng = np.random.default_rng(seed)
    while True:
        idx = rng.integers(0, len(points), batch_size)
        yield {"x": jnp.asarray(points[idx]), "label": jnp.asarray(labels[idx])}


def test_resumed_steps_equal_uninterrupted_steps():
    _, step, state = _setup()
    batches = [next(_batches(64, i)) for i in range(10)]
    straight = state
    for b in batches:
        straight, _ = step(straight, b)
    half = state
    for b in batches[:5]:
        half, _ = step(half, b)
    # A restored state is a copy of the arrays: continue from it.
    restored = jax.device_get(half)
    for b in batches[5:]:
        restored, _ = step(restored, b)
    assert int(restored.step) == 10
    for a, b in zip(jax.tree_util.tree_leaves(straight.params),
                    jax.tree_util.tree_leaves(restored.params)):
        np.testing.assert_array_equal(a, b)


def test_ema_follows_the_parameters():
    _, step, state = _setup(ema_decay=0.5)
    new, _ = step(state, next(_batches(64, 0)))
    for e, p0, p1 in zip(*(jax.tree_util.tree_leaves(t) for t in
                           (new.ema_params, state.params, new.params))):
        np.testing.assert_allclose(e, 0.5 * p0 + 0.5 * p1, rtol=1e-6, atol=1e-7)


def test_non_finite_loss_is_flagged():
    _, step, state = _setup()
    batch = next(_batches(64, 0))
    batch = {**batch, "x": batch["x"].at[3, 0].set(jnp.nan)}
    _, m = step(state, batch)
    assert not bool(m["finite"])
    _, m = step(state, next(_batches(64, 0)))
    assert bool(m["finite"])


def _generate(model, params, n, key, labels=None, scale=None):
    apply = jax.tree_util.Partial(
        lambda p, x, t, y: model.apply({"params": p}, x, t, y), params)
    denoise = parameterization.make_denoise_fn(apply, SCHEDULE, TARGET)
    if labels is None:
        fn = jax.tree_util.Partial(lambda d, x, t: d(x, t, None), denoise)
    else:
        fn = guidance.classifier_free_guidance(
            denoise, cond=labels, uncond=jnp.full_like(labels, model.num_classes), scale=scale)
    noise = jax.random.normal(key, (n, 2))
    return samplers.sample(fn, noise, schedule=SCHEDULE, method="dpmpp_2m", num_steps=40,
                           grid="trailing").samples


def test_toy2d_training_reduces_sliced_wasserstein():
    """A few thousand CPU steps on the 8-Gaussian mixture: samples from the EMA parameters get far
    closer to the data than samples from the initial network."""
    model, step, state = _setup()
    points, _ = _toy_points()
    reference = points[:4000]
    initial = metrics.sliced_wasserstein(_generate(model, state.params, 4000, jax.random.key(1)),
                                         reference)
    batches = _batches(512, 1)
    for _ in range(3000):
        state, m = step(state, next(batches))
    assert bool(m["finite"])
    trained = metrics.sliced_wasserstein(
        _generate(model, state.ema_params, 4000, jax.random.key(1)), reference)
    floor = metrics.sliced_wasserstein(points[4000:8000], reference)
    print(f"sliced W2: initial {initial:.3f}, trained {trained:.3f}, data vs data {floor:.3f}")
    assert trained < 0.35 * initial, (initial, trained)
    assert trained < 1.6 * floor, (trained, floor)


def test_class_conditional_training_with_guidance():
    """Label dropout teaches one network both denoisers; guided samples for class c land on the
    mixture's component c, unguided ones spread over all eight."""
    model, step, state = _setup(num_classes=8, label_dropout=0.15)
    batches = _batches(512, 2)
    for _ in range(2500):
        state, _ = step(state, next(batches))
    centres = np.stack([[np.cos(2 * np.pi * k / 8), np.sin(2 * np.pi * k / 8)] for k in range(8)])
    target = jnp.full((1000,), 3, jnp.int32)
    hits = {}
    for scale in (0.0, 3.0):
        x = np.asarray(_generate(model, state.ema_params, 1000, jax.random.key(4), target, scale))
        nearest = np.argmin(((x[:, None, :] - 2.0 * centres[None]) ** 2).sum(-1), axis=1)
        hits[scale] = float(np.mean(nearest == 3))
    print(f"fraction on the requested component: scale 0 {hits[0.0]:.2f}, scale 3 {hits[3.0]:.2f}")
    assert hits[0.0] < 0.3
    assert hits[3.0] > 0.95
