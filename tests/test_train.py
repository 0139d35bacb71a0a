"""Training step: determinism and resumption, EMA, NaN detection, and a real fit on 2-D data."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax import conditioning, data, guidance, losses, metrics, parallel
from diffusion_jax import optimizer as optimizer_lib
from diffusion_jax import parameterization, run, samplers, train, train_state
from diffusion_jax.models import MLP

SCHEDULE = "cosine"
TARGET = "v"


def _setup(num_classes=None, label_dropout=0.0, lr=2e-3, ema_decay=0.999, hidden=128):
    model = MLP(hidden=hidden, depth=3, num_classes=num_classes)
    optimizer = optimizer_lib.make_optimizer(lr, warmup_steps=100, grad_clip=1.0)
    apply_fn = conditioning.network_apply_fn(model, num_classes=num_classes, label_dropout=label_dropout)
    loss_fn = losses.make_loss_fn(apply_fn, schedule=SCHEDULE, parameterization=TARGET)
    step = jax.jit(train.make_train_step(loss_fn, optimizer, ema_decay=ema_decay))
    state = train_state.create_train_state(model, optimizer, jnp.zeros((1, 2)), jax.random.key(0),
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


@pytest.mark.slow  # a minute of training
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


@pytest.mark.slow  # 20 s of training; guidance itself is checked in closed form (test_guidance)
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


def test_checkpoint_fingerprint_tolerates_added_keys_and_compute_settings(tmp_path):
    """A checkpoint restores under config keys added after it was written (at their default
    values) and under a different compute dtype or remat setting, but not a different model."""
    from diffusion_jax import checkpoints as ckpt_lib

    state = {"w": jnp.arange(4.0)}
    old = ckpt_lib.Checkpoints(str(tmp_path), fingerprint={"model": {"channels": 8,
                                                                     "dtype": "float32"}},
                               asynchronous=False)
    old.save(1, state)
    old.close()

    def reopen(model, defaults):
        return ckpt_lib.Checkpoints(str(tmp_path), fingerprint={"model": model},
                                    fingerprint_defaults={"model": defaults}, asynchronous=False)

    # New key at its default, "dtype" no longer part of the fingerprint: restores.
    manager = reopen({"channels": 8, "context_dim": 0}, {"context_dim": 0})
    restored = manager.restore(jax.eval_shape(lambda: state))
    np.testing.assert_array_equal(restored["w"], state["w"])
    manager.close()
    # The new key at another value describes another network: refused, naming the key.
    manager = reopen({"channels": 8, "context_dim": 64}, {"context_dim": 0})
    with pytest.raises(ckpt_lib.CheckpointError, match="context_dim"):
        manager.restore(jax.eval_shape(lambda: state))
    manager.close()


def test_a_data_position_saved_with_other_workers_is_refused_with_the_value_to_use(tmp_path):
    from diffusion_jax import checkpoints as ckpt_lib

    source = data.Toy2D("mixture", size=256, seed=0)
    state = {"w": jnp.arange(3.0)}
    writer = data.make_iterator(source, batch_size=8, seed=1, worker_count=2)
    for _ in range(3):
        next(writer)
    manager = ckpt_lib.Checkpoints(str(tmp_path), fingerprint={}, asynchronous=False)
    manager.save(3, state, writer)
    follow = [next(writer)["x"] for _ in range(2)]
    manager.close()
    manager = ckpt_lib.Checkpoints(str(tmp_path), fingerprint={}, asynchronous=False)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"worker_count=2"):
        manager.restore(jax.eval_shape(lambda: state),
                        data.make_iterator(source, batch_size=8, seed=1))
    same = data.make_iterator(source, batch_size=8, seed=1, worker_count=2)
    manager.restore(jax.eval_shape(lambda: state), same)
    manager.close()
    for x in follow:
        np.testing.assert_array_equal(next(same)["x"], x)


def test_dropout_masks_from_either_generator():
    """model.dropout_rng: threefry and rbg masks both drop about the configured fraction, are
    the same for the same key and differ between keys (and between generators)."""
    import flax.linen as nn

    class Drop(nn.Module):
        @nn.compact
        def __call__(self, x, noise_level, labels=None, train=False):
            return nn.Dropout(0.3, deterministic=not train)(x)

    x = jnp.ones((4, 2048))
    outs = {}
    for impl in ("threefry", "rbg"):
        apply_fn = jax.jit(conditioning.network_apply_fn(Drop(), dropout_rng=impl))
        a, b, c = (apply_fn({}, x, jnp.zeros(4), {}, jax.random.key(k)) for k in (0, 0, 1))
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
        kept = np.asarray(a) != 0
        assert abs(kept.mean() - 0.7) < 0.02
        np.testing.assert_allclose(np.asarray(a)[kept], 1 / 0.7, rtol=1e-6)
        outs[impl] = a
    assert not np.array_equal(outs["threefry"], outs["rbg"])
    with pytest.raises(ValueError, match="dropout_rng"):
        conditioning.network_apply_fn(Drop(), dropout_rng="philox")


def test_compute_settings_are_not_part_of_the_run_fingerprint(tmp_path):
    """dtype, remat, the attention kernel and the dropout generator change how a network is
    computed, not what it is: a checkpoint restores under any of them."""
    from configs import tiny

    config = tiny.get_config()
    fingerprints = []
    for dtype, remat, attention, dropout_rng in (("float32", False, "xla", "threefry"),
                                                 ("bfloat16", True, "auto", "rbg")):
        config.model.dtype, config.model.remat = dtype, remat
        config.model.attention, config.model.dropout_rng = attention, dropout_rng
        manager = run.open_checkpoints(config, str(tmp_path), (16, 16, 3), 3)
        fingerprints.append(manager.fingerprint)
        manager.close()
    assert fingerprints[0] == fingerprints[1]
    assert "channels" in fingerprints[0]["model"]


def test_gradient_accumulation_and_scanned_steps_give_the_same_training():
    """Microbatches (summed gradients in a scan) and several steps per call (lax.scan over
    stacked batches) change memory and dispatch, not the result: with class labels dropped for
    the whole batch before it is split, the parameters match plain steps to float32 round-off."""
    model = MLP(hidden=64, depth=2, num_classes=4)
    optimizer = optimizer_lib.make_optimizer(2e-3, warmup_steps=5, grad_clip=1.0)
    loss_fn = losses.make_loss_fn(conditioning.network_apply_fn(model, num_classes=4),
                                  schedule=SCHEDULE, parameterization=TARGET,
                                  prepare=conditioning.drop_labels(4, 0.3))
    state = train_state.create_train_state(model, optimizer, jnp.zeros((1, 2)), jax.random.key(0),
                                     with_labels=True)
    batches = [next(_batches(32, i)) for i in range(4)]
    batches = [{**b, "label": b["label"] % 4} for b in batches]

    def run(grad_accumulation, steps_per_call):
        step = train._accumulating_step(
            train.make_train_step(loss_fn, optimizer, ema_decay=0.9,
                                  grad_accumulation=grad_accumulation), steps_per_call)
        s, running = state, {"metrics": train.TrainMetrics.empty(), "finite": jnp.asarray(True)}
        for i in range(0, len(batches), steps_per_call):
            group = batches[i:i + steps_per_call]
            batch = group[0] if steps_per_call == 1 else jax.tree_util.tree_map(
                lambda *xs: jnp.stack(xs), *group)
            s, running = jax.jit(step)(s, batch, running)
        return s, running["metrics"].compute()

    plain, plain_metrics = run(1, 1)
    for accumulation, per_call in ((4, 1), (1, 2), (2, 4)):
        other, other_metrics = run(accumulation, per_call)
        assert int(other.step) == 4
        for a, b in zip(jax.tree_util.tree_leaves(plain.params),
                        jax.tree_util.tree_leaves(other.params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(other_metrics["loss"], plain_metrics["loss"], rtol=1e-5)
    # Training moved the parameters (the comparison is not between untouched copies). Dropping
    # labels inside the network instead, with a draw per microbatch, fails the match above.
    assert not np.allclose(jax.tree_util.tree_leaves(plain.params)[0],
                           jax.tree_util.tree_leaves(state.params)[0])



def test_clip_by_global_norm_matches_optax_and_takes_the_norm_from_the_step():
    tree = {"w": jnp.arange(12.0).reshape(3, 4) / 10, "b": {"c": -jnp.ones(5), "d": jnp.zeros(())}}
    exact = float(np.sqrt(sum(np.sum(np.square(np.asarray(x)))
                              for x in jax.tree_util.tree_leaves(tree))))
    for concat_below in (0, 4, np.inf):
        np.testing.assert_allclose(
            float(parallel.global_norm(tree, concat_below=concat_below)), exact, rtol=1e-6)
    assert float(parallel.global_norm({})) == 0.0
    for max_norm in (0.5 * exact, 2 * exact):  # clipped, and left alone
        ours = optimizer_lib.clip_by_global_norm(max_norm)
        reference = jax.tree_util.tree_map(np.asarray, optax.clip_by_global_norm(max_norm).update(
            tree, optax.EmptyState())[0])
        assert ours.init(tree) == optax.clip_by_global_norm(max_norm).init(tree)
        for kwargs in ({}, {"grad_norm": parallel.global_norm(tree, concat_below=np.inf)}):
            got, _ = ours.update(tree, optax.EmptyState(), **kwargs)
            for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(reference)):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # The norm handed in is the one used (the train step computes it once, for the metric too).
    halved, _ = optimizer_lib.clip_by_global_norm(1.0).update(tree, optax.EmptyState(),
                                                      grad_norm=jnp.float32(2.0))
    np.testing.assert_allclose(halved["w"], np.asarray(tree["w"]) / 2)
    # The optimizer's state has the same structure as with optax's clipping, so checkpoints
    # written before still restore.
    params = {"w": jnp.zeros((3, 4))}
    with_optax = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    assert (jax.tree_util.tree_structure(optimizer_lib.make_optimizer(1e-3).init(params))
            == jax.tree_util.tree_structure(with_optax.init(params)))


def test_gradient_norm_reduces_small_leaves_together():
    tree = {f"p{i}": jnp.ones((i + 1, 3)) for i in range(40)}  # 3 to 120 elements

    def reductions(concat_below):  # in the compiled program
        compiled = jax.jit(lambda t: parallel.global_norm(
            t, concat_below=concat_below)).lower(tree).compile()
        return compiled.as_text().count(" reduce(")

    assert reductions(0) >= 40
    assert reductions(np.inf) == 1
    assert reductions(61) == 1 + 20  # leaves of 60 elements or fewer together, the rest alone


def test_state_in_other_device_layouts_moves_saves_and_restores(tmp_path):
    """With ``mesh.state_layouts="auto"`` the train state lives in the device layouts the
    compiler picked (on a GPU, convolution kernels re-ordered). A CPU keeps row-major arrays, so
    column-major stands in here: placing the state moves only what differs (donating the old
    copy), and values, a checkpoint and the restored state do not depend on the layout."""
    from jax.experimental.layout import Format, Layout

    from diffusion_jax import checkpoints

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    column_major = Format(Layout((1, 0)), device)
    w0 = jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32) / 1000
    given = {"w": jnp.array(w0), "n": jnp.zeros((), jnp.int32)}
    formats = {"w": column_major, "n": given["n"].format}
    state = train.place_state(given, formats)
    assert state["w"].format.layout.major_to_minor == (1, 0)
    assert given["w"].is_deleted() and state["n"] is given["n"]  # moved and donated / kept
    np.testing.assert_array_equal(state["w"], w0)
    np.testing.assert_allclose(jax.jit(lambda w: w @ w.T)(state["w"]), w0 @ w0.T, rtol=1e-6)

    manager = checkpoints.Checkpoints(str(tmp_path), fingerprint={"test": 1})
    manager.save(3, state)
    manager.wait()
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), state)
    restored = manager.restore(abstract)
    manager.close()
    np.testing.assert_array_equal(restored["w"], w0)
    resumed = train.place_state(restored, formats)
    assert resumed["w"].format.layout.major_to_minor == (1, 0)
    np.testing.assert_array_equal(resumed["w"], w0)


def test_a_step_returning_other_layouts_than_it_takes_still_chains():
    from jax.experimental.layout import Format, Layout

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    column_major = Format(Layout((1, 0)), device)
    # Takes w column-major but returns it row-major: its next call could not take its output
    # as it comes, so compile_train_step says so and moves it back after every step.
    step = jax.jit(lambda state, x, running: ({"w": state["w"] * 2}, running + x),
                   in_shardings=({"w": column_major}, device, device),
                   out_shardings=({"w": device}, device))
    with pytest.warns(RuntimeWarning, match=r"\['w'\].*state_layouts='default'"):
        compiled, state = train.compile_train_step(step, {"w": jnp.ones((4, 3))}, jnp.ones(()),
                                                   jnp.zeros(()))
    running = jnp.zeros(())
    for _ in range(3):
        state, running = compiled(state, jnp.ones(()), running)
    assert state["w"].format.layout.major_to_minor == (1, 0)
    np.testing.assert_array_equal(state["w"], 8 * np.ones((4, 3)))
    assert float(running) == 3.0


def test_checkpoints_written_through_standard_save_still_restore(tmp_path):
    """Checkpoints of earlier versions stored the state with Orbax's StandardSave; the state
    item now goes through PyTreeCheckpointHandler (for its type handlers): same files, and the
    old ones restore, fingerprint check included."""
    import orbax.checkpoint as ocp

    from diffusion_jax import checkpoints

    state = {"params": {"w": jnp.arange(12.0).reshape(3, 4)}, "step": jnp.array(7, jnp.int32)}
    old = ocp.CheckpointManager(str(tmp_path))
    old.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        meta=ocp.args.JsonSave({"test": 1})))
    old.wait_until_finished()
    old.close()

    manager = checkpoints.Checkpoints(str(tmp_path), fingerprint={"test": 1})
    restored = manager.restore(jax.tree_util.tree_map(jnp.zeros_like, state))
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, state)
    with pytest.raises(checkpoints.CheckpointError, match="different model"):
        checkpoints.Checkpoints(str(tmp_path), fingerprint={"test": 2}).restore(state)
    manager.save(6, restored)  # and the next save goes on in the same folder
    manager.close()
    assert manager.all_steps() == [5, 6]
