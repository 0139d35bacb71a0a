"""Bad inputs a user can give the command line: each is one ``error:`` line and exit code 2.

Every case runs ``main.py``'s own flag parsing and ``main()`` in this process (as ``python main.py
...`` would, without the cost of a new interpreter), checks the exit code and the error line, and
that nothing earlier in the work directory changed. docs/reliability.md lists the cases and what
survives what.
"""

import gzip
import hashlib
import os
import pathlib
import re
import shutil
import struct
import sys

import numpy as np
import pytest
from absl import flags

from configs import tiny
from diffusion_jax import loop_control, train, workdir

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import main as cli  # noqa: E402  (main.py at the repository root)

TINY = str(ROOT / "configs" / "tiny.py")


def run_cli(capsys, *args):
    """``python main.py ARGS`` in this process: ``(exit code, stdout, stderr)``."""
    values = flags.FlagValues()  # fresh flags, as a new process would have
    cli.define_flags(values)
    sys.modules.pop("config_config", None)  # ml_collections' module of the last config file
    argv, saved = ["main.py", *args], sys.argv
    sys.argv = argv  # ml_collections reads the --config.KEY overrides from sys.argv
    code = 0
    try:
        cli.main(cli.parse_flags(argv, values), values)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.argv = saved
    out = capsys.readouterr()
    return code, out.out, out.err


def snapshot(directory):
    """Every file under ``directory`` with the digest of its contents."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(pathlib.Path(directory).rglob("*")) if p.is_file()
            and p.name != workdir.LOCK_FILE}


def expect_error(capsys, pattern, *args, unchanged=None):
    """The command fails with exit code 2 and one ``error:`` line matching ``pattern``."""
    before = snapshot(unchanged) if unchanged else None
    code, out, err = run_cli(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, out[-2000:], err[-2000:])
    assert lines and lines[-1].startswith("error: "), err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert re.search(pattern, lines[-1]), lines[-1]
    if unchanged:
        assert snapshot(unchanged) == before
    return lines[-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run trained for 4 steps (checkpoints at 3 and 4), to misuse."""
    directory = tmp_path_factory.mktemp("trained")
    config = tiny.get_config()
    config.training.num_steps = 4
    train.train_and_evaluate(config, str(directory), log=lambda line: None)
    return directory


@pytest.fixture
def run_copy(trained, tmp_path):
    """A copy of the trained run that a test may damage."""
    target = tmp_path / "run"
    shutil.copytree(trained, target)
    return target


# --------------------------------------------------------------------------------------------
# Flags and config values: refused before anything is built or written.
# --------------------------------------------------------------------------------------------

CONFIG_CASES = [
    ("--config.training.foo=1", r"config has no key training\.foo"),
    ("--config.model.channels=8", r"model\.channels is now config\.model\.unet\.channels"),
    ("--config.training.num_steps=abc", r"num_steps=abc"),
    ("--config.training.warmup_steps=-5", r"warmup_steps must be >= 0, got -5"),
    ("--config.training.grad_clip=-1", r"grad_clip must be >= 0 \(0 = off\), got -1"),
    ("--config.training.sample_every=-1", r"sample_every must be >= 0"),
    ("--config.training.learning_rate=0", r"learning_rate must be > 0"),
    ("--config.training.ema_decay=1.0", r"ema_decay must be in \[0, 1\)"),
    ("--config.training.weight_decay=-0.1", r"weight_decay must be >= 0"),
    ("--config.training.keep_checkpoints=0", r"keep_checkpoints must be > 0"),
    ("--config.training.steps_per_call=4", r"must be a multiple of config\.training\.steps_per"),
    ("--config.diffusion.label_dropout=1.5", r"label_dropout must be in \[0, 1\)"),
    ("--config.diffusion.schedule=nope", r"diffusion\.schedule='nope' is not one of"),
    ("--config.diffusion.sigma_data=0", r"sigma_data must be > 0"),
    ("--config.model.unet.channels=0", r"unet\.channels must be > 0"),
    ("--config.model.unet.channel_mult=(1,0)", r"channel_mult must be > 0"),
    ("--config.model.name=nope", r"model\.name='nope' is not one of"),
    ("--config.model.dropout=-0.5", r"model\.dropout must be in \[0, 1\)"),
    ("--config.data.batch_size=0", r"batch_size must be > 0"),
    ("--config.data.name=nope", r"data\.name='nope' is not one of"),
    ("--config.data.worker_count=-1", r"worker_count must be >= 0"),
    ("--config.data.heldout=purple", r"data\.heldout='purple' is not one of \('pairs', 'red'"),
    ("--config.data.max_objects=5", r"data\.max_objects must be in \[1, 4\], got 5"),
    ("--config.sampling.num_steps=0", r"sampling\.num_steps must be > 0"),
    ("--config.sampling.guidance_scale=-1", r"guidance_scale must be >= 0"),
    ("--config.sampling.guidance_rescale=2", r"guidance_rescale must be in \[0, 1\]"),
    ("--config.sampling.label=-2", r"sampling\.label must be >= -1"),
    ("--config.sampling.method=nope", r"sampling\.method='nope' is not one of"),
    ("--config.evaluation.likelihood_examples=-1", r"likelihood_examples must be >= 0"),
    ("--config.text.max_length=1", r"max_length must be >= 2"),
    ("--config.mesh.data=0", r"mesh\.data must be -1 or >= 1"),
    ("--config.distributed.timeout_s=0", r"timeout_s must be"),
    ("--config.seed=-1", r"seed must be >= 0"),
]


@pytest.mark.parametrize("override, pattern", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_a_bad_config_value_is_one_error_line(capsys, tmp_path, override, pattern):
    expect_error(capsys, pattern, f"--config={TINY}", f"--workdir={tmp_path / 'run'}", override)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_config_files_that_do_not_load(capsys, tmp_path):
    expect_error(capsys, r"does not exist", f"--config={tmp_path / 'nope.py'}",
                 f"--workdir={tmp_path}")
    (tmp_path / "broken.py").write_text("def get_config(:\n")
    expect_error(capsys, r"broken\.py, line 1: invalid syntax", f"--config={tmp_path}/broken.py",
                 f"--workdir={tmp_path}")
    (tmp_path / "empty.py").write_text("x = 1\n")
    expect_error(capsys, r"defines no get_config", f"--config={tmp_path}/empty.py",
                 f"--workdir={tmp_path}")
    expect_error(capsys, r"--config must have a value", f"--workdir={tmp_path}")


# --------------------------------------------------------------------------------------------
# Work directories.
# --------------------------------------------------------------------------------------------


def test_unusable_workdirs(capsys, tmp_path):
    expect_error(capsys, r"--workdir is empty", f"--config={TINY}", "--workdir=")
    (tmp_path / "file").write_text("not a directory")
    expect_error(capsys, r"is a file, not a directory", f"--config={TINY}",
                 f"--workdir={tmp_path / 'file'}")
    expect_error(capsys, r"cannot write to --workdir=/proc/diffusion_jax_run",
                 f"--config={TINY}", "--workdir=/proc/diffusion_jax_run")
    expect_error(capsys, r"is a URL", f"--config={TINY}", "--workdir=gs://bucket/run")
    for mode in ("sample", "eval"):
        expect_error(capsys, r"no trained run in .*train first", f"--config={TINY}",
                     f"--workdir={tmp_path / 'missing'}", f"--mode={mode}")
        assert not (tmp_path / "missing").exists()  # reading modes create nothing


def test_a_busy_workdir_names_the_run_that_holds_it(capsys, run_copy):
    with workdir.Lock(str(run_copy)):
        line = expect_error(capsys, r"is in use by another training run \(pid \d+ on host .+, "
                                    r"started .+\)", f"--config={TINY}", f"--workdir={run_copy}",
                            "--config.training.num_steps=6", unchanged=run_copy)
    assert str(os.getpid()) in line
    # Sampling reads the checkpoints while a run trains.
    with workdir.Lock(str(run_copy)):
        code, out, err = run_cli(capsys, f"--config={TINY}", f"--workdir={run_copy}",
                                 "--mode=sample")
    assert code == 0, err[-2000:]


def test_the_lock_dies_with_its_process(run_copy):
    """A lock is an OS file lock: released when its holder ends, so nothing stale is left."""
    with workdir.Lock(str(run_copy)):
        pass
    with workdir.Lock(str(run_copy)):  # taken again at once
        assert (run_copy / workdir.LOCK_FILE).read_text().startswith("{")


# --------------------------------------------------------------------------------------------
# Runs and checkpoints.
# --------------------------------------------------------------------------------------------


def test_a_checkpoint_under_another_forward_process_names_the_key(capsys, run_copy):
    for override, key in [("--config.diffusion.schedule=sigmoid", "diffusion.schedule"),
                          ("--config.diffusion.target=x0", "target"),
                          ("--config.model.unet.channels=32", "model.channels")]:
        for mode in ("train", "sample"):
            args = [f"--config={TINY}", f"--workdir={run_copy}", f"--mode={mode}", override,
                    "--config.training.num_steps=6"]
            line = expect_error(capsys, rf"written for a different model or data \(.*{key}",
                                *args, unchanged=run_copy)
            assert line.count(" vs config ") == 1  # the differing key only


def test_resuming_with_another_optimizer_structure_names_the_key(capsys, run_copy):
    """Without warmup the optimizer state has no step counter, so it cannot take this state."""
    expect_error(capsys, r"optimizer\.warmup: checkpoint True vs config False", f"--config={TINY}",
                 f"--workdir={run_copy}", "--config.training.warmup_steps=0",
                 "--config.training.num_steps=6", unchanged=run_copy)


def test_num_steps_below_the_checkpoint_says_so(capsys, run_copy):
    expect_error(capsys, r"is at step 4, past config\.training\.num_steps=2: nothing to train",
                 f"--config={TINY}", f"--workdir={run_copy}", "--config.training.num_steps=2",
                 unchanged=run_copy)


def test_sampling_a_missing_step_or_class(capsys, run_copy):
    expect_error(capsys, r"no checkpoint for step 99", f"--config={TINY}",
                 f"--workdir={run_copy}", "--mode=sample", "--config.sampling.checkpoint_step=99",
                 unchanged=run_copy)
    expect_error(capsys, r"sampling\.label=5 is not a class of this data", f"--config={TINY}",
                 f"--workdir={run_copy}", "--mode=sample", "--config.sampling.label=5",
                 unchanged=run_copy)


def test_a_diverging_run_saves_no_non_finite_state(capsys, tmp_path):
    """A learning rate of 1e39 makes the parameters Inf after the first step while the loss and
    gradients of that step are finite; nothing non-finite is saved and the message says so."""
    line = expect_error(capsys, r"training diverged: .* became NaN/Inf before step 1, and nothing "
                                r"from then on was saved; no checkpoint was written",
                        f"--config={TINY}", f"--workdir={tmp_path}",
                        "--config.training.learning_rate=1e39",
                        "--config.training.warmup_steps=0", "--config.training.checkpoint_every=1",
                        "--config.training.log_every=1")
    assert "learning_rate" in line
    assert not list((tmp_path / "checkpoints").iterdir())


def test_sampling_a_non_finite_checkpoint_is_refused(capsys, run_copy):
    """A checkpoint holding NaN parameters (as runs could save before states were checked) does
    not give all-NaN files and exit 0: sampling it is an error naming the step."""
    import jax
    import jax.numpy as jnp

    from diffusion_jax import run

    config = tiny.get_config()
    state, _, shape, num_classes = run.restore_run(config, str(run_copy))
    poisoned = state.replace(step=state.step + 1, ema_params=jax.tree_util.tree_map(
        lambda p: jnp.full_like(p, jnp.nan), state.ema_params))
    manager = run.open_checkpoints(config, str(run_copy), shape, num_classes)
    manager.save(5, poisoned)
    manager.close()
    expect_error(capsys, r"samples of checkpoint step 5 .* are NaN/Inf: its EMA parameters are "
                         r"not finite", f"--config={TINY}", f"--workdir={run_copy}",
                 "--mode=sample", unchanged=run_copy)
    assert not list((run_copy / "samples").glob("step5_*"))


@pytest.mark.slow  # a second diverging run; the default suite has the first (above)
def test_a_run_that_diverges_later_keeps_its_last_good_checkpoint(capsys, run_copy):
    before = snapshot(run_copy / "checkpoints")
    expect_error(capsys, r"the newest checkpoint, step 4 in .*, is the last good state",
                 f"--config={TINY}", f"--workdir={run_copy}", "--config.training.num_steps=8",
                 "--config.training.learning_rate=1e39", "--config.training.checkpoint_every=1",
                 "--config.training.log_every=1")
    assert snapshot(run_copy / "checkpoints") == before


def test_a_damaged_checkpoint_is_one_paragraph_or_falls_back(capsys, run_copy):
    """Garbage in step 4's array files: an error naming step 4 and the fix; with
    on_corrupt_checkpoint=fallback, sampling reads step 3 instead."""
    for root, _, names in os.walk(run_copy / "checkpoints" / "4" / "state"):
        for name in names:
            if name != "commit_success.txt":
                with open(os.path.join(root, name), "r+b") as f:
                    f.write(b"garbage")
    line = expect_error(capsys, r"checkpoint step 4 in .* is damaged or unreadable .*delete the "
                                r"folder .*4 to resume from step 3, or set "
                                r"training\.on_corrupt_checkpoint=\"fallback\"",
                        f"--config={TINY}", f"--workdir={run_copy}", "--mode=sample",
                        unchanged=run_copy)
    assert "TensorStore" not in line and "{" not in line
    code, out, err = run_cli(capsys, f"--config={TINY}", f"--workdir={run_copy}", "--mode=sample",
                             "--config.training.on_corrupt_checkpoint=fallback")
    assert code == 0, err[-2000:]
    assert "step3_" in out and "damaged" in err


def test_a_flipped_bit_is_an_error(capsys, run_copy):
    """One bit flipped in the middle of the largest array file of step 4: an error about step 4
    (the stored arrays are compressed, so the flip is caught by decompression or by the
    checksums saved with the checkpoint, which name the array; tests/test_checkpoints.py flips
    bits in uncompressed array data and checks the name)."""
    files = [p for p in (run_copy / "checkpoints" / "4" / "state").rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    raw = bytearray(largest.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    largest.write_bytes(bytes(raw))
    expect_error(capsys, r"checkpoint step 4 in .* is damaged or unreadable \((the data of "
                         r"(params|ema_params|opt_state).* does not match the checksum|.+)\); "
                         r"delete the folder", f"--config={TINY}", f"--workdir={run_copy}",
                 "--mode=sample", unchanged=run_copy)


def test_a_full_disk_is_found_before_training(capsys, monkeypatch, tmp_path):
    from diffusion_jax import checkpoints as checkpoints_lib

    full = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(checkpoints_lib.shutil, "disk_usage", lambda path: full)
    expect_error(capsys, r"not enough disk space .* needs about .* the disk has 1\.0 kB free",
                 f"--config={TINY}", f"--workdir={tmp_path}")
    assert not list((tmp_path / "checkpoints").iterdir())


# --------------------------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------------------------


def _idx(path, array, type_code=0x08, compress=True):
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    (gzip.open if compress else open)(path, "wb").write(payload)


def _fashion_files(directory, images=None, labels=None, image_type=0x08):
    directory.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("t10k", 8)):
        pixels = rng.integers(0, 256, (count, 28, 28)).astype(np.uint8) if images is None \
            else images
        classes = rng.integers(0, 10, count).astype(np.uint8) if labels is None else labels
        _idx(directory / f"{split}-images-idx3-ubyte.gz", pixels, image_type)
        _idx(directory / f"{split}-labels-idx1-ubyte.gz", classes)
    return directory


FASHION = ["--config.data.name=fashion_mnist", "--config.model.unet.attention_resolutions=(7,)",
           "--config.training.num_steps=2"]


def test_bad_data_files(capsys, tmp_path):
    args = [f"--config={TINY}", f"--workdir={tmp_path / 'run'}", *FASHION]
    expect_error(capsys, r"not found|apt-get install dataset-fashion-mnist", *args,
                 f"--config.data.path={tmp_path / 'nothing'}")
    floats = _fashion_files(tmp_path / "floats", images=np.zeros((16, 28, 28), np.float32),
                            image_type=0x0D)
    expect_error(capsys, r"holds 32-bit floats \(IDX type 0x0D\)", *args,
                 f"--config.data.path={floats}")
    empty = _fashion_files(tmp_path / "empty", images=np.zeros((0, 28, 28), np.uint8),
                           labels=np.zeros((0,), np.uint8))
    expect_error(capsys, r"0 records|no records", *args, f"--config.data.path={empty}")
    flipped = _fashion_files(tmp_path / "flipped")
    target = flipped / "train-images-idx3-ubyte.gz"
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    target.write_bytes(bytes(raw))
    expect_error(capsys, r"damaged gzip stream|ends early", *args,
                 f"--config.data.path={flipped}")
    wide = _fashion_files(tmp_path / "labels", labels=np.full((16,), 12, np.uint8))
    expect_error(capsys, r"label.* 12", *args, f"--config.data.path={wide}")
    assert not (tmp_path / "run" / "checkpoints").exists() or not list(
        (tmp_path / "run" / "checkpoints").iterdir())


def test_a_dataset_smaller_than_one_batch(capsys, tmp_path):
    expect_error(capsys, r"has 4 records, too few for one batch of 8", f"--config={TINY}",
                 f"--workdir={tmp_path}", "--config.data.size=4")


# --------------------------------------------------------------------------------------------
# Signals and exit codes.
# --------------------------------------------------------------------------------------------


def test_a_signal_stop_exits_with_the_signals_code(capsys, monkeypatch, tmp_path):
    """A run that SIGTERM stopped after saving exits 143 (SIGINT: 130), as a killed process
    would show, so a scheduler requeues it; a finished one exits 0."""
    for signum, code in ((15, 143), (2, 130)):
        def stopped(config, workdir, signum=signum):
            raise train.Interrupted(signum, 4, None)

        monkeypatch.setitem(cli.MODES, "train", stopped)
        assert run_cli(capsys, f"--config={TINY}", f"--workdir={tmp_path}")[0] == code


def test_a_second_signal_ends_the_process_at_once(monkeypatch, capsys):
    """The first SIGINT asks for a save and a stop; a second one, while that save runs, restores
    the signal's default action and sends it again (the process ends as a killed one would)."""
    import signal as signal_lib

    sent = []
    monkeypatch.setattr(loop_control.os, "kill", lambda pid, signum: sent.append((pid, signum)))
    # Start from Python's own handler, whatever an earlier test in this worker process left
    # installed (one run in three of the parallel suite found SIGINT ignored here).
    outside = signal_lib.signal(signal_lib.SIGINT, signal_lib.default_int_handler)
    try:
        with loop_control.StopSignals() as signals:
            signals._handle(signal_lib.SIGINT, None)
            assert signals.requested(True) and not sent
            signals._handle(signal_lib.SIGINT, None)
            assert sent == [(os.getpid(), signal_lib.SIGINT)]
            assert signal_lib.getsignal(signal_lib.SIGINT) is signal_lib.SIG_DFL
        assert "exiting without waiting for the save" in capsys.readouterr().err
        assert signal_lib.getsignal(signal_lib.SIGINT) is signal_lib.default_int_handler
    finally:
        signal_lib.signal(signal_lib.SIGINT, outside)


# --------------------------------------------------------------------------------------------
# Outputs.
# --------------------------------------------------------------------------------------------


def test_sample_outputs_never_overwrite_each_other(capsys, run_copy):
    written = []
    for extra in ([], ["--config.sampling.label=1"], ["--config.sampling.seed=3"],
                  ["--config.sampling.use_ema=False"], ["--config.sampling.num_samples=2"], []):
        code, out, err = run_cli(capsys, f"--config={TINY}", f"--workdir={run_copy}",
                                 "--mode=sample", *extra)
        assert code == 0, err[-2000:]
        written.append(out.split("wrote ")[1].split(" and ")[0])
    assert len(set(written)) == len(written)  # the repeat got its own suffix
    assert written[-1].endswith("_2.npz") and written[-1][:-len("_2.npz")] + ".npz" == written[0]
    import json
    with open(written[1][:-len(".npz")] + ".json") as f:
        settings = json.load(f)
    assert settings["sampling"]["label"] == 1 and settings["step"] == 4
    assert settings["config"]["model"]["unet"]["channels"] == 16

