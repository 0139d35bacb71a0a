"""End to end from a config: train, checkpoint, resume bit for bit, stop on a signal, refuse NaNs,
sample; clear errors for bad configs and bad checkpoints."""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from diffusion_jax import checkpoints, configuration, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**training):
    config = tiny.get_config()
    for key, value in training.items():
        setattr(config.training, key, value)
    return config


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _quiet(*args, **kwargs):
    pass


def test_cli_train_then_sample(tmp_path):
    workdir = str(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": ROOT}
    train_run = subprocess.run(
        [sys.executable, "main.py", "--config=configs/tiny.py", f"--workdir={workdir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert train_run.returncode == 0, train_run.stderr[-3000:]
    assert "step 6/6" in train_run.stdout
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
    sample_run = subprocess.run(
        [sys.executable, "main.py", "--config=configs/tiny.py", f"--workdir={workdir}",
         "--mode=sample", "--config.sampling.guidance_scale=2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert sample_run.returncode == 0, sample_run.stderr[-3000:]
    stem = os.path.join(workdir, "samples", "step6_dpmpp_2m_3steps_cfg2")
    grid = np.asarray(Image.open(stem + ".png"))
    assert grid.shape == (32, 32, 3)  # four 16x16 RGB samples in a 2 x 2 grid
    arrays = np.load(stem + ".npz")
    assert arrays["samples"].shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(arrays["labels"], [0, 1, 2, 0])


def test_resumed_run_matches_uninterrupted_run(tmp_path):
    straight = train.train_and_evaluate(_config(), str(tmp_path / "a"), log=_quiet)
    train.train_and_evaluate(_config(num_steps=3), str(tmp_path / "b"), log=_quiet)
    lines = []
    resumed = train.train_and_evaluate(_config(), str(tmp_path / "b"), log=lines.append)
    assert any("resumed from step 3" in line for line in lines)
    assert int(resumed.step) == int(straight.step) == 6
    for a, b in zip(_leaves(straight), _leaves(resumed)):
        np.testing.assert_array_equal(a, b)


def test_sigterm_saves_and_stops(tmp_path):
    def log(line):
        if line.startswith("step 2/"):
            os.kill(os.getpid(), signal.SIGTERM)

    state = train.train_and_evaluate(_config(num_steps=50), str(tmp_path), log=log)
    assert int(state.step) == 2
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_nan_stops_the_run_without_saving_it(tmp_path, monkeypatch):
    from diffusion_jax import data

    original = data.ToModelInputs.map
    calls = {"n": 0}

    def poisoned(self, record):
        out = original(self, record)
        calls["n"] += 1
        if calls["n"] > 4 * 8:  # from the fifth batch of 8 on
            out["x"] = out["x"] * np.nan
        return out

    monkeypatch.setattr(data.ToModelInputs, "map", poisoned)
    with pytest.raises(train.TrainingDiverged, match="NaN/Inf"):
        train.train_and_evaluate(_config(num_steps=6), str(tmp_path), log=_quiet)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]


def test_checkpoint_problems_are_reported_clearly(tmp_path):
    config = _config(num_steps=3)
    train.train_and_evaluate(config, str(tmp_path), log=_quiet)
    source, model, shape, num_classes, optimizer = train.build(config)
    abstract = train.abstract_train_state(model, optimizer, shape, num_classes, 0)

    other = _config(num_steps=3)
    other.model.channels = 32
    manager = train.open_checkpoints(other, str(tmp_path), shape, num_classes)
    with pytest.raises(checkpoints.CheckpointError, match="different model.*channels"):
        manager.restore(abstract)
    manager.close()

    # Corrupt the saved arrays: a clear error, not a deep traceback.
    for root, _, files in os.walk(tmp_path / "checkpoints" / "3" / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    manager = train.open_checkpoints(config, str(tmp_path), shape, num_classes)
    with pytest.raises(checkpoints.CheckpointError, match="unreadable"):
        manager.restore(abstract)
    manager.close()


def test_bad_configs_name_the_key():
    config = tiny.get_config()
    config.model.name = "transformer"
    with pytest.raises(configuration.ConfigError, match="model.name='transformer'"):
        configuration.validate(config)
    config = tiny.get_config()
    config.training.learning_rate = -1.0
    with pytest.raises(configuration.ConfigError, match="training.learning_rate must be > 0"):
        configuration.validate(config)
    config = tiny.get_config()
    config.diffusion.weighting_params = {"gama": 5}
    config.diffusion.weighting = "min_snr"
    with pytest.raises(configuration.ConfigError, match="gama"):
        configuration.validate(config)
    config = tiny.get_config()
    config.data.unknown_key = 1
    with pytest.raises(configuration.ConfigError, match="unknown config key.*data.unknown_key"):
        configuration.validate(config)
    config = tiny.get_config()
    config.diffusion.target = "eps"  # cosine has zero terminal SNR
    with pytest.raises(configuration.ConfigError, match="eps-predicting"):
        configuration.validate(config)


def test_cli_rejects_unknown_override(tmp_path):
    run = subprocess.run(
        [sys.executable, "main.py", "--config=configs/tiny.py", f"--workdir={tmp_path}",
         "--config.training.num_stepz=3"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
        timeout=300)
    assert run.returncode != 0
    assert "num_stepz" in run.stderr
    assert not os.path.exists(tmp_path / "checkpoints")
