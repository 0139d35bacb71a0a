"""Checkpoint reliability: array checksums, damaged checkpoints, full disks and permissions.

Everything here saves a tiny pytree (a few small arrays) with the library's checkpoint manager;
no model is built or trained.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from diffusion_jax import checkpoint_failures, checkpoint_integrity, checkpoint_layout, checkpoints
from diffusion_jax import data
from diffusion_jax.train_state import TrainState

KERNEL = "params['conv_in']['kernel']"


def _state(step=1):
    """A small train state with leaves of several dtypes.

    The kernel's values are random bit patterns, which zstd cannot compress: its bytes lie in
    the data file as they are, so a test can flip a bit of the array itself.
    """
    bits = jax.random.bits(jax.random.key(step), (32, 32), jnp.uint32)
    kernel = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return TrainState(
        step=jnp.array(step, jnp.int32),
        params={"conv_in": {"kernel": kernel, "bias": jnp.arange(8.0)}},
        ema_params={"scale": jnp.linspace(0, 1, 6).astype(jnp.bfloat16),
                    "mask": jnp.array([True, False, True])},
        opt_state={"count": jnp.array([3, -2, 1], jnp.int8)},
        rng=jnp.array([7, 9], jnp.uint32))


def _abstract():
    return jax.eval_shape(_state)


def _manager(directory, **kwargs):
    kwargs.setdefault("asynchronous", False)
    return checkpoints.Checkpoints(str(directory), fingerprint={"model": "tiny"}, **kwargs)


def _assert_same(restored, expected):
    """Bit for bit (the kernel holds NaN patterns, which == would call different)."""
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(expected)):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def _save(directory, steps=(1,), **kwargs):
    manager = _manager(directory, **kwargs)
    for step in steps:
        manager.save(step, _state(step))
    manager.close()


def _flip_bit(path, offset, bit=4):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def _files(folder):
    return sorted(os.path.join(root, name) for root, _, names in os.walk(folder)
                  for name in names)


def _assert_one_paragraph(message):
    assert "\n" not in message and len(message) < 700, message
    assert "TensorStore" not in message and "{" not in message, message


def test_a_flipped_bit_in_an_array_is_an_error_naming_the_array(tmp_path):
    _save(tmp_path)
    kernel = np.asarray(_state().params["conv_in"]["kernel"]).tobytes()
    middle = kernel[2000:2032]  # 32 bytes from the middle of the array
    holders = [p for p in _files(tmp_path / "1" / "state") if middle in open(p, "rb").read()]
    assert len(holders) == 1, "the kernel's bytes are stored verbatim in one data file"
    offset = open(holders[0], "rb").read().index(middle) + 16
    _flip_bit(holders[0], offset)

    with pytest.raises(checkpoints.CorruptCheckpointError) as err:
        _manager(tmp_path).restore(_abstract())
    message = str(err.value)
    _assert_one_paragraph(message)
    assert KERNEL in message and "does not match the checksum" in message
    assert "params['conv_in']['bias']" not in message  # only the damaged array
    assert f"{tmp_path / '1'}" in message and err.value.step == 1
    assert "delete it to start the run again" in message  # no earlier step to fall back to


def test_a_flip_anywhere_in_the_files_is_an_error_or_harmless(tmp_path):
    """A bit flipped at any of several places in any file of the step: either a
    CheckpointError or (where the byte is not used, such as padding) the exact saved state."""
    _save(tmp_path / "original")
    expected = _state()
    outcomes = {"error": 0, "same": 0}
    names = [os.path.relpath(p, tmp_path / "original")
             for p in _files(tmp_path / "original" / "1")]
    for trial, name in enumerate(n for n in names if not n.endswith("commit_success.txt")):
        size = os.path.getsize(tmp_path / "original" / name)
        for offset in sorted({0, size // 3, size // 2, size - 1}):
            copy = tmp_path / f"trial_{trial}_{offset}"
            shutil.copytree(tmp_path / "original", copy)
            _flip_bit(copy / name, offset)
            manager = _manager(copy)
            try:
                restored = manager.restore(_abstract())
            except checkpoints.CheckpointError as err:
                _assert_one_paragraph(str(err))
                outcomes["error"] += 1
            else:
                _assert_same(restored, expected)
                outcomes["same"] += 1
            manager.close()
    print(f"flips: {outcomes}")
    assert outcomes["error"] > 0


@pytest.mark.parametrize("where", ["host", "device"])
def test_checksums_catch_a_flip_in_every_dtype(monkeypatch, where):
    if where == "device":
        monkeypatch.setattr(checkpoint_integrity, "HOST_CHECKSUM_BYTES", 0)
    state = _state()
    leaves = checkpoint_integrity.array_leaves(state)
    saved = checkpoint_integrity.checksums(leaves)
    assert set(saved) == {"step", KERNEL, "params['conv_in']['bias']", "ema_params['scale']",
                          "ema_params['mask']", "opt_state['count']", "rng"}
    for path, leaf in leaves.items():
        raw = np.array(leaf).reshape(-1).view(np.uint8).copy()
        raw[raw.size // 2] ^= 1  # for bool: True <-> False
        changed = raw.view(np.asarray(leaf).dtype).reshape(leaf.shape)
        again = checkpoint_integrity.checksums({path: jnp.asarray(changed)})
        assert again[path]["checksum"] != saved[path]["checksum"], path
    # Two words swapped: the plain sum is the same, the position-weighted one is not.
    bias = np.arange(8.0, dtype=np.float32)
    swapped = bias[[1, 0, 2, 3, 4, 5, 6, 7]]
    a, b = (checkpoint_integrity.checksums({"b": jnp.asarray(x)})["b"]["checksum"]
            for x in (bias, swapped))
    assert a[:8] == b[:8] and a[8:] != b[8:]


def test_checksums_on_the_host_and_on_the_devices_agree(monkeypatch, x64):
    """Small arrays are summed on the host, large ones on their devices: the same numbers,
    64-bit, complex, sub-byte and PRNG key types included."""
    # 64-bit types exist under the x64 fixture.
    leaves = checkpoint_integrity.array_leaves(_state())
    rng = np.random.default_rng(0)
    leaves.update({
        "f64": jnp.asarray(rng.normal(size=(5, 3))),
        "i64": jnp.asarray(rng.integers(-2**62, 2**62, size=7)),
        "c64": jnp.asarray(rng.normal(size=4) + 1j * rng.normal(size=4), jnp.complex64),
        "f16": jnp.asarray(rng.normal(size=(2, 3)), jnp.float16),
        "u8": jnp.asarray(rng.integers(0, 255, size=9), jnp.uint8),
        "i4": jnp.asarray([-8, -1, 0, 7], jnp.int4),
        "scalar": jnp.asarray(np.float32(2.5)),
        "numpy": rng.normal(size=(3, 2)).astype(np.float32),
    })
    on_host = checkpoint_integrity.checksums(leaves)
    monkeypatch.setattr(checkpoint_integrity, "HOST_CHECKSUM_BYTES", 0)
    on_devices = checkpoint_integrity.checksums(leaves)
    key = {"key": jax.random.key(3)}  # typed PRNG keys are summed on the devices
    assert checkpoint_integrity.checksums(key)["key"]["dtype"].startswith("key")
    assert on_host == on_devices


def test_checkpoints_without_checksums_still_restore(tmp_path):
    """Checkpoints written before checksums existed: no verification, same state."""
    state = _state()
    old = ocp.CheckpointManager(str(tmp_path))
    # (the train state's checkpointed fields, as every version has written them)
    old.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(
                                            checkpoint_layout.saved_part(state)),
                                        meta=ocp.args.JsonSave({"model": "tiny"})))
    old.wait_until_finished()
    old.close()
    manager = _manager(tmp_path)
    _assert_same(manager.restore(_abstract()), state)
    manager.close()


def test_a_checksum_of_a_sharded_state_matches_the_single_device_one(tmp_path):
    """Saved from an array sharded over 8 devices (another process), verified on one."""
    script = textwrap.dedent("""
        import sys
        import jax, jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from diffusion_jax import checkpoint_integrity, checkpoints
        mesh = Mesh(jax.devices(), ("fsdp",))
        x = jnp.arange(64 * 6, dtype=jnp.float32).reshape(64, 6) * 1.5
        y = jnp.arange(16, dtype=jnp.int32)
        state = {"x": jax.device_put(x, NamedSharding(mesh, P("fsdp", None))),
                 "y": jax.device_put(y, NamedSharding(mesh, P()))}
        checkpoint_integrity.HOST_CHECKSUM_BYTES = 0  # summed on the 8 devices, not gathered
        manager = checkpoints.Checkpoints(sys.argv[1], fingerprint={}, asynchronous=False)
        manager.save(1, state)
        manager.close()
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, env=env,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    meta = json.loads((tmp_path / "1" / "meta" / "metadata").read_text())
    expected = {"x": jnp.arange(64 * 6, dtype=jnp.float32).reshape(64, 6) * 1.5,
                "y": jnp.arange(16, dtype=jnp.int32)}
    # Here, on one device, the small arrays are summed on the host.
    assert (meta["_integrity"]["arrays"]
            == checkpoint_integrity.checksums(checkpoint_integrity.array_leaves(expected)))
    manager = checkpoints.Checkpoints(str(tmp_path), fingerprint={}, asynchronous=False)
    restored = manager.restore(jax.eval_shape(lambda: expected))
    manager.close()
    _assert_same(restored, expected)


def test_an_unreadable_checkpoint_is_one_paragraph_with_the_fix(tmp_path):
    _save(tmp_path, steps=(1, 2))
    for path in _files(tmp_path / "2" / "state"):
        with open(path, "wb") as f:
            f.write(b"garbage")
    with pytest.raises(checkpoints.CorruptCheckpointError) as err:
        _manager(tmp_path).restore(_abstract())
    message = str(err.value)
    print(message)
    _assert_one_paragraph(message)
    assert message.startswith(f"checkpoint step 2 in {tmp_path} is damaged or unreadable (")
    assert f"delete the folder {tmp_path / '2'} to resume from step 1" in message
    assert 'training.on_corrupt_checkpoint="fallback"' in message


def test_reasons_drop_tensorstore_specs_and_event_loop_noise():
    spec = "TensorStore({\n  'base': {'driver': 'zarr', 'kvstore': {'path': '/x/'}},\n})"
    try:
        try:
            try:
                raise ValueError('FAILED_PRECONDITION: Error reading "params.w/0" in OCDBT: '
                                 "ZSTD_decompressStream() failed: Data corruption detected")
            except ValueError as inner:
                raise RuntimeError("Event loop is closed") from inner
        except RuntimeError as middle:
            raise Exception("Encountered error while reading array index. See full "
                            f"TensorStore details: {spec}") from middle
    except Exception as err:  # noqa: BLE001
        reason = checkpoint_failures.reason(err)
    assert reason == ('FAILED_PRECONDITION: Error reading "params.w/0" in OCDBT: '
                      "ZSTD_decompressStream() failed: Data corruption detected")
    assert checkpoint_failures.reason(Exception("x" * 500)).endswith("...")
    assert len(checkpoint_failures.reason(Exception("x" * 500))) == 200
    outer = Exception(f"Failed: {spec}")
    assert checkpoint_failures.reason(outer) == "Failed: TensorStore()"


def _iterator():
    return data.make_iterator(data.Toy2D("mixture", size=64, seed=0), batch_size=4, seed=1)


def test_fallback_restores_the_newest_readable_step_and_its_data_position(tmp_path):
    writer = _iterator()
    manager = _manager(tmp_path, max_to_keep=5)
    after = {}
    for step in (1, 2, 3):
        next(writer)
        manager.save(step, _state(step), writer)
        after[step] = next(_copy_of(writer))["x"]
    manager.close()
    kernel_file = max(_files(tmp_path / "3" / "state"), key=os.path.getsize)
    _flip_bit(kernel_file, os.path.getsize(kernel_file) // 2)

    # By default: an error, and the iterator is left alone.
    reader = _iterator()
    with pytest.raises(checkpoints.CorruptCheckpointError, match="step 3"):
        _manager(tmp_path).restore(_abstract(), reader)
    # With the fallback: step 2 and the data position of step 2, with a line on the skip.
    lines = []
    manager = _manager(tmp_path, max_to_keep=5, on_corrupt="fallback", log=lines.append)
    state = manager.restore(_abstract(), reader)
    _assert_same(state, _state(2))
    np.testing.assert_array_equal(next(reader)["x"], after[2])
    assert len(lines) == 2 and "step 3" in lines[0] and "trying step 2" in lines[0]
    assert "restored step 2 instead" in lines[1]
    # The next save of step 3 moves the damaged folder aside rather than failing on it.
    manager.save(3, _state(3), reader)
    manager.close()
    assert manager.all_steps() == [1, 2, 3]
    assert os.path.isdir(tmp_path / "3.corrupt")
    _assert_same(_manager(tmp_path).restore(_abstract()), _state(3))


def _copy_of(iterator):
    """A fresh iterator at ``iterator``'s position (to peek at its next batch)."""
    copy = _iterator()
    copy.set_state(iterator.get_state())
    return copy


def test_fallback_with_no_readable_step_and_other_models_still_stop(tmp_path):
    _save(tmp_path, steps=(1, 2))
    for step in ("1", "2"):
        for path in _files(tmp_path / step / "state"):
            with open(path, "wb") as f:
                f.write(b"garbage")
    lines = []
    manager = _manager(tmp_path, on_corrupt="fallback", log=lines.append)
    with pytest.raises(checkpoints.CheckpointError, match="no readable checkpoint in") as err:
        manager.restore(_abstract())
    _assert_one_paragraph(str(err.value))
    assert "step 2: " in str(err.value) and "step 1: " in str(err.value)
    assert len(lines) == 2
    # A checkpoint of another model is not damaged: no fallback past it.
    _save(tmp_path / "other", steps=(1, 2))
    other = checkpoints.Checkpoints(str(tmp_path / "other"), fingerprint={"model": "big"},
                                    on_corrupt="fallback", log=lines.append)
    with pytest.raises(checkpoints.CheckpointError, match="different model"):
        other.restore(_abstract())
    other.close()
    # An explicit step is restored or refused, never replaced by another.
    _save(tmp_path / "explicit", steps=(1, 2))
    for path in _files(tmp_path / "explicit" / "2" / "state"):
        with open(path, "wb") as f:
            f.write(b"garbage")
    with pytest.raises(checkpoints.CorruptCheckpointError):
        _manager(tmp_path / "explicit", on_corrupt="fallback").restore(_abstract(), step=2)


class _Usage:
    def __init__(self, free):
        self.total, self.used, self.free = 10**12, 10**12 - free, free


def test_too_little_disk_space_stops_a_save_before_it_starts(tmp_path, monkeypatch):
    manager = _manager(tmp_path)
    manager.save(1, _state(1))
    size = checkpoints.state_bytes(_state())
    assert size == 32 * 32 * 4 + 8 * 4 + 6 * 2 + 3 + 3 + 2 * 4 + 4
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: _Usage(1000))
    with pytest.raises(checkpoints.CheckpointError) as err:
        manager.save(2, _state(2))
    message = str(err.value)
    print(message)
    _assert_one_paragraph(message)
    assert message.startswith(f"not enough disk space to save step 2 in {tmp_path}: ")
    assert "the disk has 1.0 kB free" in message and "free at least" in message
    assert message.endswith("the checkpoint of step 1 is intact")
    with pytest.raises(checkpoints.CheckpointError, match="to write checkpoints"):
        manager.check_writable(size)
    manager.check_writable()  # the write test alone passes
    monkeypatch.undo()
    manager.close()
    assert manager.all_steps() == [1] and not os.path.exists(tmp_path / "2")
    _assert_same(_manager(tmp_path).restore(_abstract()), _state(1))


def test_a_full_disk_during_a_background_save_is_a_checkpoint_error(tmp_path, monkeypatch,
                                                                     capfd):
    manager = _manager(tmp_path, asynchronous=True)
    manager.save(1, _state(1))
    manager.wait()

    async def full(self, item, directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", full)
    manager.save(2, _state(2))  # returns; the write fails in the background
    monkeypatch.undo()
    capfd.readouterr()
    with pytest.raises(checkpoints.CheckpointError) as err:
        manager.save(3, _state(3))  # reported at the next save, before it starts
    message = str(err.value)
    print(message)
    _assert_one_paragraph(message)
    assert message.startswith(f"could not save step 2 in {tmp_path} (the disk is full: ")
    assert "free space on that disk" in message
    assert message.endswith("the checkpoint of step 1 is intact")
    assert "Traceback" not in capfd.readouterr().err  # Orbax's log lines stay one line each
    # The same failure at the end of a run comes out of close().
    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", full)
    manager.save(3, _state(3))
    monkeypatch.undo()
    with pytest.raises(checkpoints.CheckpointError, match="could not save step 3 .* disk is full"):
        manager.close()
    assert manager.all_steps() == [1]
    assert sorted(os.listdir(tmp_path)) == ["1"]  # no unfinished folder left taking space
    reopened = _manager(tmp_path)
    _assert_same(reopened.restore(_abstract()), _state(1))
    reopened.save(2, _state(2))  # the failed step saves fine once there is room
    reopened.close()
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_a_save_that_fails_at_once_names_the_problem(tmp_path, monkeypatch):
    manager = _manager(tmp_path)
    manager.save(1, _state(1))

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path))

    monkeypatch.setattr(ocp.CheckpointManager, "save", read_only)
    with pytest.raises(checkpoints.CheckpointError) as err:
        manager.save(2, _state(2))
    monkeypatch.undo()
    message = str(err.value)
    _assert_one_paragraph(message)
    assert message.startswith(f"could not save step 2 in {tmp_path} (the file system is "
                              "read-only: ")
    assert "make it writable" in message
    manager.close()


@pytest.mark.parametrize("code, words", [(errno.EROFS, "the file system is read-only"),
                                         (errno.EACCES, "permission denied"),
                                         (errno.ENOSPC, "the disk is full")])
def test_a_directory_that_cannot_be_written_is_reported_before_training(tmp_path, monkeypatch,
                                                                        code, words):
    manager = _manager(tmp_path / "ckpt")
    real_open = os.open

    def refusing_open(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    with pytest.raises(checkpoints.CheckpointError) as err:
        manager.check_writable(10)
    monkeypatch.undo()
    message = str(err.value)
    _assert_one_paragraph(message)
    assert message.startswith(f"could not write checkpoints in {tmp_path / 'ckpt'} ({words}: ")
    manager.check_writable(10)
    assert os.listdir(tmp_path / "ckpt") == []  # the probe file is gone
    manager.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_is_reported_before_training(tmp_path):
    folder = tmp_path / "ckpt"
    manager = _manager(folder)
    os.chmod(folder, 0o555)
    try:
        with pytest.raises(checkpoints.CheckpointError, match="permission denied"):
            manager.check_writable()
    finally:
        os.chmod(folder, 0o755)
        manager.close()
