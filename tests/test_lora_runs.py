"""Runs that train LoRA adapters of a frozen model (config.lora) through the ordinary loop.

A tiny base run is trained once; adapter runs on it must start exactly at the base (a fresh
adapter changes nothing), train and checkpoint only the adapters (their optimizer state and
EMA alone; the base is held once and read again on resuming), resume bit for bit, sample through
``--mode=sample``, and refuse configs that cannot work, naming the key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import flax.traverse_util
import jax
import numpy as np
import pytest

from configs import tiny
from conftest import kill_at_step_and_rerun
from diffusion_jax import checkpoints as ckpt_lib
from diffusion_jax import configuration, generate, lora_runs, run, train, train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quiet(line):
    pass


@pytest.fixture
def base(tiny_base_run):
    return tiny_base_run  # (conftest.py: a tiny run trained once, shared with test_controlnet)


def _config(base_dir, **lora):
    config = tiny.get_config()
    config.lora.update({"rank": 4, "base": base_dir, **lora})
    config.training.update(num_steps=4, checkpoint_every=2, warmup_steps=0)
    return config


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _folder_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(path)
               for f in names)


@pytest.mark.slow  # a base run and an adapter run
def test_adapter_run_starts_at_the_base_and_trains_only_the_adapters(base, tmp_path):
    config = _config(base)
    base_state, model, shape, num_classes = run.restore_run(tiny.get_config(), base)
    _, _, _, _, optimizer = run.build(config)
    abstract = run.abstract_state(config, model, optimizer, shape, num_classes)
    adapter_shapes = {tuple(a.shape) for a in jax.tree_util.tree_leaves(abstract.params)}
    names = {path[-1] for path in flax.traverse_util.flatten_dict(abstract.params)}
    assert names == {"down", "up"}
    # Adam's moments are the adapters' shapes (and its step count): nothing of the base.
    for leaf in jax.tree_util.tree_leaves(abstract.opt_state):
        assert leaf.shape == () or tuple(leaf.shape) in adapter_shapes
    mesh = run.build_mesh(config)
    workdir = str(tmp_path / "adapt")
    os.makedirs(workdir)
    fresh = run.initial_adapter_state(config, workdir, model, optimizer, shape, num_classes,
                                      abstract, mesh)
    for a, b in zip(_leaves(train_state.model_params(fresh)), _leaves(base_state.ema_params)):
        np.testing.assert_array_equal(a, b)  # a fresh adapter is the base, bit for bit
    with open(os.path.join(workdir, lora_runs.LORA_FILE)) as f:
        assert json.load(f) == {"base": os.path.realpath(base), "base_step": 6}

    lines = []
    state = train.train_and_evaluate(config, str(tmp_path / "run"), log=lines.append)
    assert any("LoRA adapters (rank 4, 8 layers" in line for line in lines), lines[:3]
    for a, b in zip(_leaves(state.frozen), _leaves(base_state.ema_params)):
        np.testing.assert_array_equal(a, b)  # the base did not move
    ups = [np.abs(np.asarray(v)).max() for p, v in
           flax.traverse_util.flatten_dict(state.params).items() if p[-1] == "up"]
    assert min(ups) > 0  # every adapter trained
    # The checkpoints hold the adapters, a fraction of the base run's.
    ours = _folder_bytes(os.path.join(tmp_path, "run", "checkpoints", "4"))
    theirs = _folder_bytes(os.path.join(base, "checkpoints", "6"))
    assert ours < 0.25 * theirs, (ours, theirs)
    # --mode=sample: the base with the EMA adapters merged in.
    written = generate.generate_to_files(config, str(tmp_path / "run"))
    samples = np.load(written[0])["samples"]
    assert samples.shape == (4, 16, 16, 3) and np.isfinite(samples).all()


@pytest.mark.slow  # three short runs; the default suite resumes full runs (test_main.py)
def test_resumed_adapter_run_matches_an_uninterrupted_one(base, tmp_path):
    straight = train.train_and_evaluate(_config(base), str(tmp_path / "a"), log=_quiet)
    first = _config(base)
    first.training.num_steps = 2
    train.train_and_evaluate(first, str(tmp_path / "b"), log=_quiet)
    lines = []
    resumed = train.train_and_evaluate(_config(base), str(tmp_path / "b"), log=lines.append)
    assert any("resumed from step 2" in line for line in lines)
    for a, b in zip(_leaves(straight.replace(frozen=None)), _leaves(resumed.replace(frozen=None))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # a run killed in a subprocess and rerun: ~1 minute
def test_adapter_run_killed_with_sigkill_resumes_exactly(base, tmp_path):
    num_steps = 24
    overrides = [f"--config.training.num_steps={num_steps}", "--config.training.log_every=1",
                 "--config.training.checkpoint_every=4", "--config.lora.rank=4",
                 f"--config.lora.base={base}", "--config.training.warmup_steps=0"]
    command = [sys.executable, "main.py", "--config=configs/tiny.py",
               f"--workdir={tmp_path / 'killed'}", *overrides]
    kill_at_step_and_rerun(command, 10, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    config = _config(base)
    config.training.update(num_steps=num_steps, log_every=1, checkpoint_every=4)
    straight = train.train_and_evaluate(config, str(tmp_path / "straight"), log=_quiet)
    killed, *_ = run.restore_run(config, str(tmp_path / "killed"))
    for a, b in zip(_leaves(straight.replace(frozen=None)), _leaves(killed.replace(frozen=None))):
        np.testing.assert_array_equal(a, b)


def test_adapter_configs_that_cannot_work_are_refused(base, tmp_path):
    cases = [(dict(base=""), "give its weights with config.lora.base"),
             (dict(base=str(tmp_path / "nowhere")), "is not a directory"),
             (dict(text_encoder=True), None)]
    for change, match in cases:
        config = _config(base, **change)
        if match is None:
            config.text.freeze = True
            match = "text.freeze=True stops gradients"
        with pytest.raises(configuration.ConfigError, match=match):
            configuration.validate(config)
    config = _config(base)
    config.mesh.train_step = "shard_map"
    with pytest.raises(configuration.ConfigError, match="mesh.train_step='jit'"):
        configuration.validate(config)
    config = _config(base, targets="no_such_layer")
    with pytest.raises(configuration.ConfigError, match="select no kernel"):
        train.train_and_evaluate(config, str(tmp_path / "t"), log=_quiet)
    config = _config(base)
    config.model.unet.channels = 8  # another model than the base run's
    with pytest.raises(configuration.ConfigError, match="trained another model"):
        train.train_and_evaluate(config, str(tmp_path / "m"), log=_quiet)
    # A resumed run must keep its base.
    train.train_and_evaluate(_config(base, rank=2), str(tmp_path / "r"), log=_quiet)
    other = str(tmp_path / "other_base")
    os.makedirs(other)
    with open(os.path.join(other, "config.json"), "w") as f:
        f.write("{}")
    config = _config(base, rank=2, base=other)
    config.training.num_steps = 6
    with pytest.raises(configuration.ConfigError, match="resume with that base"):
        train.train_and_evaluate(config, str(tmp_path / "r"), log=_quiet)


def test_an_adapter_run_is_not_restored_as_its_base(base, tmp_path):
    # The fingerprint records the adapters (rank 0 when there are none), so a config without
    # them is refused by name instead of failing inside Orbax on the state's shape.
    config = _config(base)
    config.training.update(num_steps=2, checkpoint_every=2)
    workdir = str(tmp_path / "adapt")
    train.train_and_evaluate(config, workdir, log=_quiet)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"lora.rank: checkpoint 4 vs config 0"):
        run.restore_run(tiny.get_config(), workdir)
    state, *_ = run.restore_run(tiny.get_config(), base)  # the base's, written with "off" too
    assert int(state.step) == 6
