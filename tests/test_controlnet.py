"""ControlNet (models/controlnet.py): the module, the control window, and ControlNet runs.

The wrapped model must start exactly at its base for any control image, equal the base at
conditioning scale 0 whatever the ControlNet's weights, and sum several ControlNets' residuals
with their own scales. ControlNet runs train only the ControlNet on a frozen base through the
ordinary loop, checkpoint and resume it, and sample under control images.
"""

from __future__ import annotations

import json
import os

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from diffusion_jax import configuration, controlnet_runs, generate, guidance, run, train
from diffusion_jax import train_state
from diffusion_jax.models.controlnet import (ControlledUNet, DiTControlNet, controlnet_for,
                                             embedding_channels_for, init_from_base)
from diffusion_jax.models.dit import DiT
from diffusion_jax.models.unet import UNet

UNET = UNet(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
            dropout=0.0, context_dim=8, num_groups=8)
X = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
T = jnp.array([0.3, 0.8])
CONTEXT = jax.random.normal(jax.random.key(1), (2, 3, 8))


def _perturbed(params, key, scale):
    """Every leaf moved by noise: a base whose output is not zero, a ControlNet that acts."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [a + scale * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def nets():
    base = UNET.init(jax.random.key(2), X, T, context=CONTEXT)["params"]
    base = _perturbed(base, jax.random.key(3), 0.05)
    controlnet = controlnet_for(UNET, factor=2)
    control = jax.random.uniform(jax.random.key(4), (2, 16, 16, 3))
    fresh = init_from_base(controlnet.init(jax.random.key(5), X, T, control,
                                           context=CONTEXT)["params"], base)
    trained = _perturbed(fresh, jax.random.key(6), 0.05)
    return base, controlnet, fresh, trained


def _base_fn():
    return jax.jit(lambda p: UNET.apply({"params": p}, X, T, context=CONTEXT))


def _controlled_fn(controlnets):
    model = ControlledUNet(UNET, controlnets)
    return jax.jit(lambda p, control, scale: model.apply(
        {"params": p}, X, T, context=CONTEXT, control=control, control_scale=scale))


def test_a_fresh_controlnet_is_the_base_for_any_control_and_scale_0_always(nets):
    base, controlnet, fresh, trained = nets
    expected = np.asarray(_base_fn()(base))
    assert np.abs(expected).max() > 0.1  # a base whose output says something
    apply = _controlled_fn((controlnet,))
    for seed in range(2):
        control = jax.random.uniform(jax.random.key(10 + seed), (2, 16, 16, 3))
        np.testing.assert_array_equal(
            apply({"unet": base, "controlnets_0": fresh}, control, 1.0), expected)
        np.testing.assert_array_equal(
            apply({"unet": base, "controlnets_0": trained}, control, 0.0), expected)
        moved = apply({"unet": base, "controlnets_0": trained}, control, 1.0)
        assert np.abs(moved - expected).max() > 1e-2  # a trained ControlNet acts


def test_several_controlnets_sum_their_scaled_residuals(nets):
    base, controlnet, _, trained = nets
    control = jax.random.uniform(jax.random.key(20), (2, 16, 16, 3))
    one = _controlled_fn((controlnet,))({"unet": base, "controlnets_0": trained}, control, 1.0)
    two = _controlled_fn((controlnet, controlnet))
    params = {"unet": base, "controlnets_0": trained, "controlnets_1": trained}
    halves = two(params, (control, control), jnp.array([0.5, 0.5]))
    np.testing.assert_allclose(halves, one, atol=1e-5)
    alone = two(params, (control, jnp.zeros_like(control)), jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(alone, one, atol=1e-5)
    # Per-example scales: the first example controlled, the second not.
    mixed = two(params, (control, control), jnp.array([[0.5, 0.5], [0.0, 0.0]]))
    expected = _base_fn()(base)
    np.testing.assert_allclose(mixed[0], one[0], atol=1e-5)
    np.testing.assert_allclose(mixed[1], expected[1], atol=1e-5)


def test_control_errors_name_the_problem(nets):
    base, controlnet, fresh, _ = nets
    model = ControlledUNet(UNET, (controlnet,))
    params = {"unet": base, "controlnets_0": fresh}
    with pytest.raises(ValueError, match=r"takes \[batch, 16, 16, 3\].*8x8|takes \[batch, 16, 16, 3\]"):
        model.apply({"params": params}, X, T, context=CONTEXT, control=jnp.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match="3 channels"):
        model.apply({"params": params}, X, T, context=CONTEXT,
                    control=jnp.zeros((2, 16, 16, 1)))
    with pytest.raises(ValueError, match="2 control images for 1 ControlNets"):
        model.apply({"params": params}, X, T, context=CONTEXT,
                    control=(jnp.zeros((2, 16, 16, 3)),) * 2)
    other = UNet(channels=16, channel_mult=(1, 1), num_res_blocks=1, attention_resolutions=(8,),
                 dropout=0.0, context_dim=8, num_groups=8)
    other_base = other.init(jax.random.key(7), X, T, context=CONTEXT)["params"]
    with pytest.raises(ValueError, match=r"down_1_res_0/conv_0/kernel has shape"):
        init_from_base(fresh, other_base)


def test_pooled_residuals_reach_every_pixel(nets):
    # diffusers' global_pool_conditions: each residual averaged over the image, broadcast back.
    base, controlnet, _, trained = nets
    pooled = controlnet.clone(pool_residuals=True)
    control = jax.random.uniform(jax.random.key(30), (2, 16, 16, 3))
    down, mid = pooled.apply({"params": trained}, X, T, control, context=CONTEXT)
    assert all(r.shape[1:3] == (1, 1) for r in down) and mid.shape[1:3] == (1, 1)
    out = _controlled_fn((pooled,))({"unet": base, "controlnets_0": trained}, control, 1.0)
    assert np.abs(out - _base_fn()(base)).max() > 1e-3


def test_embedding_channels_follow_the_size_ratio():
    assert embedding_channels_for(1) == (16,)
    assert embedding_channels_for(8) == (16, 32, 96, 256)
    assert embedding_channels_for(16) == (16, 32, 96, 256, 256)
    with pytest.raises(ValueError, match="power of 2"):
        embedding_channels_for(3)


def _diffusers_keep(i, n, start, end):
    # diffusers' StableDiffusionControlNetPipeline: controlnet_keep for step i of n.
    return 1.0 - float(i / n < start or (i + 1) / n > end)


@pytest.mark.parametrize("n,start,end", [(10, 0.0, 1.0), (10, 0.2, 0.55), (7, 0.1, 0.9),
                                         (4, 0.0, 0.5), (30, 0.33, 1.0)])
def test_the_control_window_is_diffusers_controlnet_keep(n, start, end):
    np.testing.assert_array_equal(guidance.control_window(n, start, end),
                                  [_diffusers_keep(i, n, start, end) for i in range(n)])


def test_the_windowed_control_scales_each_step_by_its_weight():
    times = np.linspace(1.0, 0.0, 6)  # 5 steps, then the final time
    weights = guidance.control_window(5, 0.2, 0.8)

    def model_fn(x, t, cond):
        return cond["control_scale"][:, 0]

    fn = guidance.windowed_control(model_fn, times[:-1], weights)
    t = jnp.asarray(times[:-1], jnp.float32)
    seen = fn(jnp.zeros((5,)), t, {"control_scale": jnp.full((5, 1), 0.5)})
    np.testing.assert_array_equal(seen, 0.5 * weights)
    with pytest.raises(ValueError, match="start < end"):
        guidance.control_window(5, 0.5, 0.5)


# -- ControlNet runs ------------------------------------------------------------------------


def _quiet(line):
    pass


@pytest.fixture
def base_run(tiny_base_run):
    return tiny_base_run  # (conftest.py: a tiny run trained once, shared with test_lora_runs)


def _config(base_dir, **controlnet):
    config = tiny.get_config()
    config.controlnet.update({"control": "canny", "base": base_dir, **controlnet})
    config.training.update(num_steps=4, checkpoint_every=2, warmup_steps=0)
    return config


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_a_calls_edit_must_keep_the_strength_the_control_window_was_made_for():
    """A ControlNet's window counts the steps that run, so a per-call edit of another strength
    (or none, after a function made for editing) is refused rather than mis-windowed."""
    import types
    controls = types.SimpleNamespace(strength=0.5)
    edit = generate.EditInputs(jnp.zeros((1, 8, 8, 3)), None, 0.5)
    generate._Controls.check_edit(controls, edit)  # the same strength: accepted
    for other in (edit._replace(strength=0.75), None):
        with pytest.raises(ValueError, match="made for editing strength 0.5"):
            generate._Controls.check_edit(controls, other)


@pytest.mark.slow  # a base run and a ControlNet run: about a minute
def test_a_controlnet_run_starts_at_the_base_and_trains_only_the_controlnet(base_run, tmp_path):
    config = _config(base_run)
    base_state, base_model, shape, num_classes = run.restore_run(tiny.get_config(), base_run)
    _, model, _, _, optimizer = run.build(config)
    abstract = run.abstract_state(config, model, optimizer, shape, num_classes)
    names = {path[0] for path in flax.traverse_util.flatten_dict(abstract.params)}
    assert "control_embedding" in names and "control_mid" in names
    assert not any(name.startswith("up_") for name in names)  # only the encoder is copied
    workdir = str(tmp_path / "control")
    os.makedirs(workdir)
    mesh = run.build_mesh(config)
    fresh = run.initial_adapter_state(config, workdir, model, optimizer, shape, num_classes,
                                      abstract, mesh)
    with open(os.path.join(workdir, controlnet_runs.CONTROLNET_FILE)) as f:
        assert json.load(f) == {"base": os.path.realpath(base_run), "base_step": 6}
    # The copy holds the base's encoder; the fresh ControlNet leaves the output unchanged.
    flat_base = flax.traverse_util.flatten_dict(base_state.ema_params)
    for path, leaf in flax.traverse_util.flatten_dict(fresh.params).items():
        if path in flat_base:
            np.testing.assert_array_equal(leaf, flat_base[path])
    x = jax.random.normal(jax.random.key(0), (2,) + tuple(shape))
    control = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
    t = jnp.array([0.2, 0.9])
    expected = jax.jit(lambda p: base_model.apply({"params": p}, x, t))(base_state.ema_params)
    got = jax.jit(lambda p: model.apply({"params": p}, x, t, control=control))(
        train_state.model_params(fresh))
    np.testing.assert_array_equal(got, expected)

    lines = []
    state = train.train_and_evaluate(config, str(tmp_path / "run"), log=lines.append)
    assert any("a ControlNet (canny control" in line for line in lines), lines[:3]
    for a, b in zip(_leaves(state.frozen), _leaves(base_state.ema_params)):
        np.testing.assert_array_equal(a, b)  # the base did not move
    mid = flax.traverse_util.flatten_dict(state.params)[("control_mid", "kernel")]
    assert np.abs(np.asarray(mid)).max() > 0  # the zero convolution trained
    written = generate.generate_to_files(config, str(tmp_path / "run"))
    arrays = np.load(written[0])
    assert arrays["samples"].shape == (4, 16, 16, 3) and np.isfinite(arrays["samples"]).all()
    assert arrays["controls"].shape == (4, 16, 16, 3)
    assert any(p.endswith("_controls.png") for p in written)


@pytest.mark.slow  # three short runs
def test_a_resumed_controlnet_run_matches_an_uninterrupted_one(base_run, tmp_path):
    straight = train.train_and_evaluate(_config(base_run), str(tmp_path / "a"), log=_quiet)
    first = _config(base_run)
    first.training.num_steps = 2
    train.train_and_evaluate(first, str(tmp_path / "b"), log=_quiet)
    lines = []
    resumed = train.train_and_evaluate(_config(base_run), str(tmp_path / "b"), log=lines.append)
    assert any("resumed from step 2" in line for line in lines)
    for a, b in zip(_leaves(straight.replace(frozen=None)),
                    _leaves(resumed.replace(frozen=None))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("overrides,match", [
    ({"controlnet.control": "edges"}, r"controlnet.control='edges' is not one of"),
    ({"controlnet.control": "canny"}, "give its weights with config.controlnet.base"),
    ({"controlnet.base": "/nonexistent"}, "set config.controlnet.control"),
    ({"sampling.control_start": 0.6, "sampling.control_end": 0.4}, "must be below control_end"),
    ({"sampling.control_image": "/nonexistent.png"}, "which is not a file"),
    ({"pretrained.controlnet": "/nonexistent"}, "which is not a directory"),
    ({"sampling.control_type": "canny"}, "set it, or leave control_type"),
    ({"sampling.control_scales": (0.5,)}, "applies to ControlNets: this config has none"),
    ({"sampling.control_end": 0.5}, "applies to ControlNets: this config has none"),
    ({"controlnet.embedding_channels": (16,)}, "is a setting of a ControlNet run"),
    ({"controlnet.control": "canny", "controlnet.base": "/tmp",
      "sampling.control_scales": (1.0, 0.5)}, "2 values for 1 ControlNet"),
    ({"controlnet.control": "canny", "controlnet.base": "/tmp", "lora.rank": 4,
      "lora.base": "/tmp"},
     "train the ControlNet and the LoRA in separate runs"),
])
def test_bad_controlnet_settings_are_refused_by_key(overrides, match):
    config = tiny.get_config()
    for key, value in overrides.items():
        group, name = key.split(".")
        config[group][name] = value
    with pytest.raises(configuration.ConfigError, match=match):
        configuration.validate(config)


def test_a_controlnet_of_vector_data_is_refused(base_run):
    config = _config(base_run)
    config.model.name = "mlp"
    config.data.name = "toy2d"
    with pytest.raises(ValueError, match="computes control maps from images"):
        run.build(config)


@pytest.mark.slow  # DiT-S networks trained a few steps
def test_a_dit_controlnet_starts_at_its_base_and_acts_once_trained():
    """PixArt's ControlNet-Transformer on our DiT: the copied blocks' zero linear layers make a
    fresh one the base bit for bit; scale 0 is the base for any weights; residuals reach only
    the first half of the blocks."""
    dit = DiT(patch_size=2, hidden=32, depth=4, num_heads=2, context_dim=8)
    base = _perturbed(dit.init(jax.random.key(0), X, T, context=CONTEXT)["params"],
                      jax.random.key(1), 0.05)
    controlnet = controlnet_for(dit, factor=2)
    assert isinstance(controlnet, DiTControlNet) and controlnet.copied_blocks == 2
    control = jax.random.uniform(jax.random.key(2), (2, 16, 16, 3))
    fresh = init_from_base(controlnet.init(jax.random.key(3), X, T, control,
                                           context=CONTEXT)["params"], base)
    assert {k for k in fresh if k.startswith("block_")} == {"block_0", "block_1"}
    assert not any(k.startswith("final_") for k in fresh)
    trained = _perturbed(fresh, jax.random.key(4), 0.05)
    model = ControlledUNet(dit, (controlnet,))
    apply = jax.jit(lambda p, s: model.apply({"params": p}, X, T, context=CONTEXT,
                                             control=control, control_scale=s))
    expected = jax.jit(lambda p: dit.apply({"params": p}, X, T, context=CONTEXT))(base)
    np.testing.assert_array_equal(apply({"unet": base, "controlnets_0": fresh}, 1.0), expected)
    np.testing.assert_array_equal(apply({"unet": base, "controlnets_0": trained}, 0.0), expected)
    assert np.abs(apply({"unet": base, "controlnets_0": trained}, 1.0) - expected).max() > 1e-2
    with pytest.raises(ValueError, match=r"takes \[batch, 16, 16, 3\]"):
        model.apply({"params": {"unet": base, "controlnets_0": fresh}}, X, T, context=CONTEXT,
                    control=jnp.zeros((2, 8, 8, 3)))


@pytest.mark.slow  # two DiT-S runs
def test_a_controlnet_run_of_a_dit_trains_and_samples(tmp_path):
    base_config = tiny.get_config()
    base_config.model.name = "dit"
    base_config.model.dit.update(size="S", patch_size=4)
    base_config.training.num_steps = 2
    base_config.training.checkpoint_every = 2
    base_config.training.log_every = 2
    base_dir = str(tmp_path / "base")
    train.train_and_evaluate(base_config, base_dir, log=_quiet)
    config = base_config.copy_and_resolve_references()
    config.controlnet.update(control="mask", base=base_dir)
    lines = []
    state = train.train_and_evaluate(config, str(tmp_path / "control"), log=lines.append)
    assert any("a ControlNet (mask control" in line for line in lines), lines[:3]
    names = set(state.params)
    assert "control_patch" in names and "control_out_0" in names and "final_linear" not in names
    written = generate.generate_to_files(config, str(tmp_path / "control"))
    assert np.load(written[0])["samples"].shape == (4, 16, 16, 3)


@pytest.mark.slow  # two tiny runs and sampling at four settings
def test_the_adherence_benchmark_runs_the_whole_protocol(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workdir = str(tmp_path / "adherence")
    done = subprocess.run(
        [sys.executable, "controlnet_adherence.py", "--tiny", "--workdir", workdir,
         "--base-steps", "4", "--steps", "2", "--num", "6", "--batch", "3", "--scales", "0", "1",
         "--set", "sampling.num_steps=2", "--grid-dir", str(tmp_path / "grids")],
        cwd=os.path.join(root, "benchmarks"), capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(workdir, "controlnet_mask.json")) as f:
        result = json.load(f)
    rows = result["evaluation"]["rows"]
    ceiling, chance = rows[0], rows[1]
    # The mask is exact; Canny's smoothing moves a few edge pixels of 16 px objects that touch.
    assert ceiling["mask_iou"] == 1.0 and ceiling["edge_f1"] > 0.95
    assert chance["mask_iou"] < ceiling["mask_iou"] and chance["edge_f1"] < ceiling["edge_f1"]
    generated = [r for r in rows if "control_scale" in r]
    assert [(r["guidance"], r["control_scale"]) for r in generated] == [
        (1.0, 0.0), (1.0, 1.0), (3.0, 0.0), (3.0, 1.0)]
    for row in rows:
        assert all(0 <= row[k] <= 1 for k in ("mask_iou", "edge_f1", "colour_right"))
    assert result["controlnet_train"]["steps"] == 2 and result["base_train"]["steps"] == 4
    sizes = result["evaluation"]
    assert 0 < sizes["controlnet"]["params"] < sizes["base"]["params"]
    assert "ControlNet:" in done.stdout
    assert os.path.isfile(tmp_path / "grids" / "mask_g3_s1.png")
