"""End to end from a config: train, checkpoint, resume bit for bit, stop on a signal, refuse NaNs,
sample; clear errors for bad configs and bad checkpoints."""

import glob
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import kill_at_step_and_rerun

from configs import tiny
from diffusion_jax import checkpoints, configuration, files, loop_control, run, train
from diffusion_jax import train_state

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


def _read_events(directory):
    """Every (tag, step, value-or-image) in the TensorBoard event files under ``directory``,
    read by hand from the TFRecord framing (8-byte length, 4-byte CRC, payload, 4-byte CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    found = []
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            blob = f.read()
        offset = 0
        while offset < len(blob):
            (length,) = struct.unpack("<Q", blob[offset:offset + 8])
            payload = blob[offset + 12:offset + 12 + length]
            offset += 12 + length + 4
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                kind = value.WhichOneof("value")
                found.append((value.tag, event.step,
                              value.simple_value if kind == "simple_value" else value.image))
    return found


def test_cli_train_then_sample(tmp_path):
    workdir = str(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": ROOT}
    train_run = subprocess.run(
        [sys.executable, "main.py", "--config=configs/tiny.py", f"--workdir={workdir}",
         "--config.training.sample_every=3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert train_run.returncode == 0, train_run.stderr[-3000:]
    assert "step 2/6 [######--------------]  33%  loss " in train_run.stdout
    assert "step 6/6 [####################] 100%  loss " in train_run.stdout
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
    assert sorted(os.listdir(os.path.join(workdir, "samples"))) == [
        "step_00000003.png", "step_00000006.png"]

    # TensorBoard: averaged loss and gradient norm, learning rate, speed, and the sample grids.
    events = _read_events(os.path.join(workdir, "tensorboard"))
    scalars = {}
    for tag, step, value in events:
        scalars.setdefault(tag, {})[step] = value
    assert sorted(scalars["train/loss"]) == [2, 4, 6]
    assert all(np.isfinite(v) and v > 0 for v in scalars["train/loss"].values())
    assert sorted(scalars["train/grad_norm"]) == [2, 4, 6]
    # Warmup over 2 steps to 1e-3: the rate used by steps 2, 4 and 6.
    np.testing.assert_allclose([scalars["train/learning_rate"][s] for s in (2, 4, 6)],
                               [5e-4, 1e-3, 1e-3], rtol=1e-6)
    assert all(v > 0 for v in scalars["train/steps_per_sec"].values())
    images = {step: value for tag, step, value in events if tag == "samples/ema"}
    assert sorted(images) == [3, 6]
    assert (images[6].height, images[6].width) == (32, 32)
    sample_run = subprocess.run(
        [sys.executable, "main.py", "--config=configs/tiny.py", f"--workdir={workdir}",
         "--mode=sample", "--config.sampling.guidance_scale=2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert sample_run.returncode == 0, sample_run.stderr[-3000:]
    (npz,) = glob.glob(os.path.join(workdir, "samples", "step6_dpmpp_2m_3steps_cfg2_*.npz"))
    stem = npz[:-len(".npz")]
    with open(stem + ".json") as f:  # the settings beside the samples
        assert json.load(f)["sampling"]["guidance_scale"] == 2
    grid = np.asarray(Image.open(stem + ".png"))
    assert grid.shape == (32, 32, 3)  # four 16x16 RGB samples in a 2 x 2 grid
    arrays = np.load(stem + ".npz")
    assert arrays["samples"].shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(arrays["labels"], [0, 1, 2, 0])

    # Inpainting from the command line: the unmasked region of every sample is the input image
    # exactly; the masked region is painted (differs from the input).
    picture = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 2:10] = 255
    Image.fromarray(picture).save(tmp_path / "input.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    inpaint_run = subprocess.run(
        [sys.executable, "main.py", "--config=configs/tiny.py", f"--workdir={workdir}",
         "--mode=sample", f"--config.sampling.init_image={tmp_path / 'input.png'}",
         f"--config.sampling.mask_image={tmp_path / 'mask.png'}",
         "--config.sampling.method=ddim", "--config.sampling.jump_length=1",
         "--config.sampling.jump_n_sample=2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert inpaint_run.returncode == 0, inpaint_run.stderr[-3000:]
    (npz,) = glob.glob(os.path.join(workdir, "samples", "step6_inpaint1_ddim_3steps_*.npz"))
    samples = np.load(npz)["samples"]
    given = picture.astype(np.float32) / 255.0 * 2.0 - 1.0
    kept = mask == 0
    for sample in samples:
        np.testing.assert_array_equal(sample[kept], given[kept])
        assert np.abs(sample[~kept] - given[~kept]).mean() > 0.1


def test_resumed_run_matches_uninterrupted_run(tmp_path):
    straight = train.train_and_evaluate(_config(), str(tmp_path / "a"), log=_quiet)
    train.train_and_evaluate(_config(num_steps=3), str(tmp_path / "b"), log=_quiet)
    lines = []
    resumed = train.train_and_evaluate(_config(), str(tmp_path / "b"), log=lines.append)
    assert any("resumed from step 3" in line for line in lines)
    assert int(resumed.step) == int(straight.step) == 6
    for a, b in zip(_leaves(straight), _leaves(resumed)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # two runs in subprocesses; SIGTERM and resumption are in the default run
def test_run_killed_with_sigkill_resumes_to_the_same_parameters(tmp_path):
    """kill -9 gives the run no chance to clean up: it may die mid-step or mid-save. Rerunning
    the same command must resume from the last complete checkpoint and end where an
    uninterrupted run ends, bit for bit."""
    num_steps = 40
    overrides = [f"--config.training.num_steps={num_steps}", "--config.training.log_every=1",
                 "--config.training.checkpoint_every=4"]
    command = [sys.executable, "main.py", "--config=configs/tiny.py",
               f"--workdir={tmp_path / 'killed'}", *overrides]
    rerun = kill_at_step_and_rerun(command, 10, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    resumed_from = [line for line in rerun.stdout.splitlines() if "resumed from step" in line]
    assert resumed_from, rerun.stdout
    assert 0 < int(resumed_from[0].split("resumed from step ")[1].split()[0]) < num_steps

    straight = train.train_and_evaluate(_config(num_steps=num_steps, log_every=1,
                                                checkpoint_every=4),
                                        str(tmp_path / "straight"), log=_quiet)
    config = _config(num_steps=num_steps)
    _, model, shape, num_classes, optimizer = run.build(config)
    manager = run.open_checkpoints(config, str(tmp_path / "killed"), shape, num_classes)
    assert manager.latest_step() == num_steps
    killed = manager.restore(train_state.abstract_train_state(model, optimizer, shape, num_classes, 0))
    manager.close()
    for a, b in zip(_leaves(straight), _leaves(killed)):
        np.testing.assert_array_equal(a, b)


def test_sigterm_saves_and_stops(tmp_path):
    def log(line):
        if line.startswith("step 2/"):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(train.Interrupted) as stopped:
        train.train_and_evaluate(_config(num_steps=50), str(tmp_path), log=log)
    assert stopped.value.exit_code == 143 and stopped.value.step == 2
    assert int(stopped.value.state.step) == 2
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_the_loop_stays_at_most_two_step_calls_ahead_of_the_device(tmp_path, monkeypatch):
    """The window waits for the call two back each time a call is dispatched (JAX would
    otherwise let the loop queue every step up to the next log line, and a signal's checkpoint
    would wait for all of them)."""
    window = loop_control.DispatchWindow(ahead=2)
    waited = []
    monkeypatch.setattr(loop_control, "_wait", lambda mark: waited.append(int(mark)))
    for i in range(5):
        window.dispatched(jax.numpy.asarray(i))
    assert waited == [0, 1, 2]
    with pytest.raises(ValueError, match="ahead must be at least 1"):
        loop_control.DispatchWindow(ahead=0)

    # In a run of 12 single-step calls between log lines, each call after the third waits.
    waited.clear()
    train.train_and_evaluate(_config(num_steps=12, log_every=12, checkpoint_every=12,
                                     sample_every=0), str(tmp_path), log=_quiet)
    assert len(waited) == 12 - 1 - 2  # the first call (compiled and timed) waits by itself


def test_signal_during_sampling_still_saves(tmp_path, monkeypatch):
    """A signal that lands after the step's save decision (here: while the sample grid is
    written) stops the run one step later, with a checkpoint of that step."""
    original = files.save_png

    def save_and_signal(*args, **kwargs):
        grid = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return grid

    monkeypatch.setattr(files, "save_png", save_and_signal)
    lines = []
    with pytest.raises(train.Interrupted) as stopped:
        train.train_and_evaluate(_config(num_steps=50, sample_every=3, checkpoint_every=100),
                                 str(tmp_path), log=lines.append)
    assert int(stopped.value.state.step) == 4
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]
    assert lines[-1] == "received signal 15: saved step 4 and stopped"


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
    source, model, shape, num_classes, optimizer = run.build(config)
    abstract = train_state.abstract_train_state(model, optimizer, shape, num_classes, 0)

    other = _config(num_steps=3)
    other.model.unet.channels = 32
    manager = run.open_checkpoints(other, str(tmp_path), shape, num_classes)
    with pytest.raises(checkpoints.CheckpointError, match="different model.*channels"):
        manager.restore(abstract)
    manager.close()

    # Corrupt the saved arrays: a clear error, not a deep traceback.
    for root, _, names in os.walk(tmp_path / "checkpoints" / "3" / "state"):
        for name in names:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    manager = run.open_checkpoints(config, str(tmp_path), shape, num_classes)
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
    config.mesh.fsdp = 0
    with pytest.raises(configuration.ConfigError, match="mesh.fsdp must be -1"):
        configuration.validate(config)
    for key, value, message in (("num_processes", 0, "num_processes must be -1"),
                                ("process_id", 2, "process_id must be -1 .* from 0 to"),
                                ("timeout_s", -5, "timeout_s must be a whole number")):
        config = tiny.get_config()
        config.distributed.num_processes = 2
        setattr(config.distributed, key, value)
        with pytest.raises(configuration.ConfigError, match=message):
            configuration.validate(config)
    config = tiny.get_config()
    config.mesh.data = 3  # this process sees one CPU device
    with pytest.raises(configuration.ConfigError, match="must use all 1 devices"):
        run.build_mesh(config)
    config = tiny.get_config()
    config.data.worker_count = -2
    with pytest.raises(configuration.ConfigError, match="data.worker_count must be >= 0"):
        configuration.validate(config)
    config = tiny.get_config()
    config.model.attention = "flash"
    with pytest.raises(configuration.ConfigError, match="model.attention='flash'"):
        configuration.validate(config)
    config = tiny.get_config()
    config.model.dropout_rng = "philox"
    with pytest.raises(configuration.ConfigError, match="model.dropout_rng='philox'"):
        configuration.validate(config)
    config = tiny.get_config()
    config.diffusion.target = "eps"  # cosine has zero terminal SNR
    with pytest.raises(configuration.ConfigError, match="eps-predicting"):
        configuration.validate(config)


def test_bad_editing_settings_are_refused_early(tmp_path):
    picture = tmp_path / "input.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(picture)
    cases = [(dict(init_image=str(tmp_path / "missing.png")), "init_image=.* is not a file"),
             (dict(mask_image=str(picture)), "mask_image needs config.sampling.init_image"),
             (dict(init_image=str(picture), strength=1.5), "strength must be -1 or in"),
             (dict(strength=0.5), "strength applies to an input image"),
             (dict(init_image=str(picture), jump_n_sample=3), "resampling.* is for inpainting"),
             (dict(init_image=str(picture), mask_image=str(picture), jump_length=0),
              "jump_length must be > 0")]
    for settings, message in cases:
        config = tiny.get_config()
        for key, value in settings.items():
            setattr(config.sampling, key, value)
        with pytest.raises(configuration.ConfigError, match=message):
            configuration.validate(config)
    config = tiny.get_config()
    config.sampling.init_image = str(picture)
    assert configuration.editing_strength(config) == 0.8
    config.sampling.mask_image = str(picture)
    assert configuration.editing_strength(config) == 1.0


def test_cli_rejects_unknown_override(tmp_path):
    run = subprocess.run(
        [sys.executable, "main.py", "--config=configs/tiny.py", f"--workdir={tmp_path}",
         "--config.training.num_stepz=3"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
        timeout=300)
    assert run.returncode != 0
    assert "num_stepz" in run.stderr
    assert not os.path.exists(tmp_path / "checkpoints")


def test_a_url_workdir_is_refused_with_what_to_use():
    run = subprocess.run(
        [sys.executable, "main.py", "--config=configs/tiny.py", "--workdir=gs://bucket/run"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
        timeout=300)
    assert run.returncode == 2
    assert "is a URL" in run.stderr and "gcsfuse" in run.stderr


def test_a_launch_of_several_processes_joins_them_or_says_how(tmp_path):
    """Under srun with two tasks (and nothing else JAX can read the coordinator from), main.py
    tries to join the others instead of training alone into the shared workdir, and says how to
    name the coordinator or run alone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "TPU_"))
           and k != "JAX_COORDINATOR_ADDRESS"}
    run = subprocess.run(
        [sys.executable, "main.py", "--config=configs/tiny.py", f"--workdir={tmp_path}"],
        cwd=ROOT, env={**env, "PYTHONPATH": ROOT, "SLURM_STEP_NUM_TASKS": "2"},
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "joining a run of several processes: srun started 2 processes" in run.stdout
    assert "coordinator_address" in run.stderr and "auto_detect=False" in run.stderr
    assert not os.path.exists(tmp_path / "checkpoints")

