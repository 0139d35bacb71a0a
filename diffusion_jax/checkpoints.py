"""Orbax checkpoints of the train state and the data iterator.

Each checkpoint is checked to belong to the current config and to hold the bytes it was saved
with: checksums of every array, computed on the devices at save time, are compared again after a
restore, so a damaged file is an error naming the array rather than a silently different model.
Loading never executes code from the files (Orbax/tensorstore arrays and JSON only), and a crash
mid-save leaves the previous checkpoint intact (Orbax commits a step only once all of it is
written). A full disk or a directory that cannot be written is reported before a save starts
where it can be foreseen, and as a :class:`CheckpointError` naming what to free or change where
it cannot (also for an asynchronous save, at the next save or at :meth:`Checkpoints.close`).
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import re
import shutil
import sys
import warnings
from typing import Any, Callable, Optional

import grain.python as grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from diffusion_jax import checkpoint_failures as failures
from diffusion_jax import checkpoint_integrity as integrity_lib
from diffusion_jax.checkpoint_layout import restored_as as _restored_as
from diffusion_jax.checkpoint_layout import saved_part as _saved_part
from diffusion_jax.checkpoint_integrity import state_bytes

__all__ = ["CheckpointError", "CorruptCheckpointError", "Checkpoints", "state_bytes",
           "ON_CORRUPT_CHOICES"]

ON_CORRUPT_CHOICES = ("error", "fallback")
# Where a checkpoint's array checksums live in its JSON "meta" item, next to the fingerprint (a
# key no fingerprint has; fingerprint comparisons read only the keys of the current one).
_INTEGRITY_KEY = "_integrity"
_CHECKSUM_ALGORITHM = "uint32-sum+position-weighted-sum/v1"
# Free space wanted before a save: the state's bytes (Orbax stores them uncompressed or
# smaller) times this margin, plus room for the metadata files.
SPACE_MARGIN = 1.1
SPACE_SLACK_BYTES = 2**20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or from a different model; the message says which."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files are damaged or unreadable (not merely from another config).

    ``step`` is the step whose folder is affected, ``reason`` the short description of the
    failure used in the message, and ``agreed`` whether every process knows of it (always so
    with one process), which a fallback to an earlier step needs.
    """

    def __init__(self, message: str, *, step: int, reason: str, agreed: bool = True):
        super().__init__(message)
        self.step = step
        self.reason = reason
        self.agreed = agreed


def _worker_count(state) -> Optional[int]:
    """The grain worker count recorded in an iterator state (JSON bytes/str), if any."""
    try:
        return int(json.loads(state)["worker_count"])
    except (TypeError, ValueError, KeyError):
        return None


def _check_worker_count(where: str, iterator) -> None:
    """Raises a clear error when the checkpoint's data worker count differs from this run's.

    Grain restores a data position only into an iterator with the worker count that saved it
    (workers each batch their own share of the records): say so before Orbax fails."""
    path = os.path.join(where, "data", f"process_{jax.process_index()}-of-"
                                       f"{jax.process_count()}.json")
    if not os.path.exists(path) or not hasattr(iterator, "get_state"):
        return
    with open(path, "rb") as f:
        saved = _worker_count(f.read())
    current = _worker_count(iterator.get_state())
    if saved is not None and current is not None and saved != current:
        raise CheckpointError(
            f"checkpoint {where} was written with config.data.worker_count={saved}, this run "
            f"reads data with {current}; resume with --config.data.worker_count={saved} (the "
            "examples that share a batch depend on the worker count)")


def _check_process_count(where: str) -> None:
    """Raises a clear error when the checkpoint was written by another number of processes.

    Each process saves its own data position (``data/process_<i>-of-<n>.json``); a run with
    another process count has none to restore, which grain reports as an unreadable file."""
    directory = os.path.join(where, "data")
    if not os.path.isdir(directory):
        return
    written = {int(m.group(1)) for m in (re.fullmatch(r"process_\d+-of-(\d+)\.json", f)
                                         for f in os.listdir(directory)) if m}
    if written and jax.process_count() not in written:
        count = max(written)
        raise CheckpointError(
            f"checkpoint {where} was written by {count} process(es), this run has "
            f"{jax.process_count()}: each process saved its own position in the data, so a run "
            f"resumes only with {count} (the model state itself restores on any number of "
            "devices and processes, as --mode=sample and --mode=eval read it)")


def _restore_target(leaf):
    """Shape, dtype and sharding to restore a leaf into.

    A leaf without a sharding goes to the first local device, so a checkpoint written on any
    number of devices restores on one."""
    target = ocp.utils.to_shape_dtype_struct(leaf)
    if getattr(target, "sharding", None) is None:
        target = jax.ShapeDtypeStruct(target.shape, target.dtype,
                                      sharding=jax.sharding.SingleDeviceSharding(
                                          jax.local_devices()[0]))
    return target


_MISSING = "<missing>"

# Orbax's replica-parallel saving splits each replicated array into one slice per replica, so that
# the replicas write it in parallel; each slice is a jit-compiled program, one per array shape
# and sharding. For the many small arrays of a diffusion model's state (biases, norms, EMA and
# Adam copies of them) that is hundreds of compiles at the first save, seconds to tens of seconds,
# to speed up writes that take microseconds. Only arrays whose per-replica slice has at least
# this many bytes are split; the rest are written whole by their first replica (as Orbax does on
# GPU). It is large enough to leave a diffusion UNet or DiT unsplit and small enough to split a
# multi-GB embedding table.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 64 * 2**20


def _type_handler_registry():
    """Orbax's standard type handlers, with jax.Array saved as described above.

    Built per checkpoint manager rather than changing Orbax's global registry, which other code
    may use."""
    handlers = [(ty, ocp.type_handlers.get_type_handler(ty))
                for ty in ocp.type_handlers.supported_types() if ty is not jax.Array]
    array_handler = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL,
        # Keep the array metadata the default handler writes.
        array_metadata_store=getattr(ocp.type_handlers.get_type_handler(jax.Array),
                                     "_array_metadata_store", None))
    return ocp.type_handlers.create_type_handler_registry(*handlers, (jax.Array, array_handler))


def _align(stored, current, defaults):
    """``stored`` (a checkpoint's fingerprint) read with the keys of ``current``.

    Keys it lacks take their value from ``defaults`` (settings added since it was written), and
    keys the current fingerprint no longer has are left out (settings since removed)."""
    if not isinstance(stored, dict) or not isinstance(current, dict):
        return stored
    defaults = defaults if isinstance(defaults, dict) else {}
    return {key: (_align(stored[key], current[key], defaults.get(key)) if key in stored
                  else defaults.get(key, _MISSING))
            for key in current}


def _flat(tree, prefix=""):
    """A fingerprint's leaves by dotted path (``model.channels``), so a mismatch names them."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _all_processes_agree(ok: bool) -> bool:
    """Whether ``ok`` holds on every process (so that all take the same branch)."""
    if jax.process_count() == 1:
        return ok
    flags = multihost_utils.process_allgather(np.array([int(ok)], np.int32))
    return bool(np.all(flags))


def _print_warning(line: str) -> None:
    """The default ``log``: a line on stderr."""
    print(line, file=sys.stderr, flush=True)


class Checkpoints:
    """Save and restore ``(TrainState, data iterator)`` under ``directory/<step>``.

    ``fingerprint`` (a JSON-able dict: the model config and the data shape) is stored with each
    step; restoring under a different fingerprint raises :class:`CheckpointError` listing the keys
    that differ instead of failing later with an array-shape traceback. Each step also stores a
    checksum of every array, verified after a restore.

    ``on_corrupt`` says what :meth:`restore` does when the newest checkpoint is damaged or
    unreadable: ``"error"`` raises :class:`CorruptCheckpointError`; ``"fallback"`` restores the
    newest readable earlier step instead and reports the skipped ones through ``log`` (one line
    each; by default printed to stderr). Skipped steps are moved aside to
    ``directory/<step>.corrupt`` at the next save. ``check_space`` compares the free disk space
    with the state's size before each save.
    """

    def __init__(self, directory: str, *, fingerprint: dict, max_to_keep: int = 3,
                 asynchronous: bool = True, fingerprint_defaults: Optional[dict] = None,
                 on_corrupt: str = "error", log: Optional[Callable[[str], None]] = None,
                 check_space: bool = True):
        if on_corrupt not in ON_CORRUPT_CHOICES:
            raise ValueError(f"on_corrupt={on_corrupt!r}; choose one of {ON_CORRUPT_CHOICES}")
        self.directory = os.path.abspath(directory)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # normalise tuples to lists
        # Values assumed for keys a checkpoint's fingerprint lacks (keys added to the config
        # after it was written), so older checkpoints of the same model still restore.
        self.fingerprint_defaults = json.loads(json.dumps(fingerprint_defaults or {}))
        self.on_corrupt = on_corrupt
        self.log = log or _print_warning
        self.check_space = check_space
        self._pending_step: Optional[int] = None  # an asynchronous save not yet waited for
        self._skipped_steps: list = []  # damaged steps a fallback restore passed over
        self._skipped_log = self.log
        # The state goes through a PyTreeCheckpointHandler with this module's type handlers
        # (StandardCheckpointHandler, a thin wrapper of it, takes none); the files are the same
        # either way, so checkpoints written through StandardSave restore too.
        state_handler = ocp.PyTreeCheckpointHandler(
            type_handler_registry=_type_handler_registry())
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add("state", ocp.args.PyTreeSave, state_handler)
        registry.add("state", ocp.args.PyTreeRestore, state_handler)
        try:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=max_to_keep, create=True,
                    enable_async_checkpointing=asynchronous,
                    # Partial folders of saves that failed (a full disk) are removed on reopening.
                    cleanup_tmp_directories=True,
                ),
                handler_registry=registry,
            )
        except OSError as err:
            raise CheckpointError(self._write_problem(err, "open the checkpoint folder")) from err
        failures.install_quiet_unraisable_hook()
        if failures.OneLineOrbaxErrors.users == 0:
            logging.getLogger("absl").addFilter(failures.ORBAX_FILTER)
        failures.OneLineOrbaxErrors.users += 1
        self._closed = False

    def latest_step(self) -> Optional[int]:
        """The newest step saved in the directory, or None."""
        return self._manager.latest_step()

    def all_steps(self):
        """The steps saved in the directory, oldest first."""
        return list(self._manager.all_steps())

    # --- Saving ----------------------------------------------------------------------------

    def needed_bytes(self, state_size: int) -> int:
        """Free bytes wanted before saving a state of ``state_size`` bytes."""
        return int(state_size * SPACE_MARGIN) + SPACE_SLACK_BYTES

    def check_writable(self, estimated_bytes: Optional[int] = None) -> None:
        """Check now that checkpoints can be written, before any training time is spent.

        Creates the directory, writes, syncs and deletes a small file there, and (given
        ``estimated_bytes``, e.g. ``state_bytes(abstract_state)``) checks the free disk space
        against one checkpoint of that size. Raises :class:`CheckpointError` saying what to
        free or change.
        """
        probe = os.path.join(self.directory,
                             f".write_test_{jax.process_index()}_{os.getpid()}")
        try:
            os.makedirs(self.directory, exist_ok=True)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"checkpoint write test\n")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as err:
            raise CheckpointError(self._write_problem(err, "write checkpoints")) from err
        if estimated_bytes is not None:
            self._check_free_space(estimated_bytes, "to write checkpoints")

    def _check_free_space(self, size: int, purpose: str) -> None:
        """Raise :class:`CheckpointError` when the disk lacks room for a checkpoint of ``size``."""
        if not self.check_space:
            return
        needed = self.needed_bytes(size)
        try:
            usage = shutil.disk_usage(self.directory)
        except OSError:
            usage = None  # nothing to compare with; a failing write is still reported
        # Some network and FUSE file systems report no sizes at all: no check there.
        enough = usage is None or usage.total == 0 or usage.free >= needed
        if _all_processes_agree(enough):
            return
        if enough:  # this process has room, another has not (a disk of its own)
            raise CheckpointError(f"another process has too little disk space {purpose} in "
                                  f"{self.directory}; see its message{self._intact()}")
        raise CheckpointError(
            f"not enough disk space {purpose} in {self.directory}: a checkpoint of this state "
            f"needs about {failures.size_text(needed)}, the disk has {failures.size_text(usage.free)} free; free at least "
            f"{failures.size_text(needed - usage.free)} there (old runs, or keep fewer checkpoints) or use a "
            f"--workdir on a larger disk{self._intact()}")

    def _intact(self) -> str:
        """``"; the checkpoint of step N is intact"`` when there is one, else nothing."""
        if not hasattr(self, "_manager"):  # the manager itself could not be opened
            return ""
        steps = [s for s in self.all_steps() if s not in self._skipped_steps]
        return f"; the checkpoint of step {max(steps)} is intact" if steps else ""

    def _write_problem(self, err: BaseException, action: str) -> str:
        """One paragraph on a failed write: what happened and what to free or change."""
        code = failures.os_problem(err)
        where = self.directory
        if code in (errno.ENOSPC, errno.EDQUOT):
            try:
                free = f" ({failures.size_text(shutil.disk_usage(where).free)} free now)"
            except OSError:
                free = ""
            fix = (f"free space on that disk{free}, e.g. old runs or fewer kept checkpoints, or "
                   "use a --workdir on a larger disk")
        elif code is not None:
            fix = ("make it writable for this user (or remount it read-write), or use a "
                   "--workdir on a writable file system")
        else:
            fix = "check the disk and the file system, then restart (training resumes)"
        what = failures.OS_PROBLEMS.get(code) or failures.reason(err)
        if code is not None:
            what = f"{what}: {failures.reason(err)}"
        return f"could not {action} in {where} ({what}); {fix}{self._intact()}"

    def _wait_for_pending(self) -> None:
        """Wait for the asynchronous save in flight; its failure as a :class:`CheckpointError`."""
        step, self._pending_step = self._pending_step, None
        try:
            self._manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001 - whatever the background write raised
            action = "save the checkpoint" if step is None else f"save step {step}"
            self._settle_failed_save(step)
            raise CheckpointError(self._write_problem(err, action)) from err

    def _settle_failed_save(self, step: Optional[int]) -> None:
        """After a failed save: let its other writes finish, then delete its unfinished folder.

        Orbax reports the first failed write while the others may still be running; they are
        awaited (through Orbax internals where present) so nothing writes after the error is
        raised. The folder ``<step>.orbax-checkpoint-tmp`` then only takes space, the space the
        next save needs on a full disk: one process removes it (with several, each may still be
        writing its part; Orbax removes it when the directory is next opened).
        """
        async_manager = getattr(getattr(self._manager, "_checkpointer", None),
                                "_async_manager", None)
        for pending in getattr(async_manager, "_commit_futures", None) or ():
            try:
                pending.result()
            except Exception:  # noqa: BLE001, S110 - the failure is being reported already
                pass
        if step is None or jax.process_count() > 1 or not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            if name.startswith(f"{step}.orbax-checkpoint-tmp"):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def save(self, step: int, state: Any, iterator=None) -> None:
        """Save ``state`` (and ``iterator``'s position) as ``step``.

        Waits for the previous asynchronous save and reports its failure first; checks the
        free space against the state's size; then starts this save, which runs in the
        background when the manager is asynchronous. Raises :class:`CheckpointError` on a
        full disk or a missing permission, naming the directory and what to free or change.
        """
        step = int(step)
        state = _saved_part(state)
        self._wait_for_pending()
        self._set_aside_skipped_steps()
        self._check_free_space(state_bytes(state), f"to save step {step}")
        arrays = integrity_lib.checksums(integrity_lib.array_leaves(state))
        meta = dict(self.fingerprint)
        meta[_INTEGRITY_KEY] = {"algorithm": _CHECKSUM_ALGORITHM, "arrays": arrays,
                                "crc32": integrity_lib.meta_crc32(self.fingerprint, arrays)}
        items = {"state": ocp.args.PyTreeSave(state), "meta": ocp.args.JsonSave(meta)}
        if iterator is not None:
            items["data"] = grain.PyGrainCheckpointSave(iterator)
        try:
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as err:  # noqa: BLE001 - mapped to one paragraph with the fix
            self._settle_failed_save(step)
            raise CheckpointError(self._write_problem(err, f"save step {step}")) from err
        self._pending_step = step

    def _set_aside_skipped_steps(self) -> None:
        """Move the damaged steps a fallback restore skipped to ``<step>.corrupt``.

        Done at the first save after that restore (a newer checkpoint is on its way), so that
        they neither take a slot of ``max_to_keep`` nor collide with the same step saved again.
        Nothing is deleted: the folder stays there for inspection.
        """
        if not self._skipped_steps:
            return
        if jax.process_index() == 0:
            for step in self._skipped_steps:
                source = os.path.join(self.directory, str(step))
                target, n = f"{source}.corrupt", 1
                while os.path.exists(target):
                    target, n = f"{source}.corrupt{n}", n + 1
                if not os.path.isdir(source):
                    continue
                try:
                    os.rename(source, target)
                except OSError as err:
                    raise CheckpointError(self._write_problem(
                        err, f"move the damaged step {step} aside")) from err
                self._skipped_log(f"moved the damaged checkpoint {source} to {target}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("diffusion_jax_checkpoints_set_aside")
        self._skipped_steps = []
        self._manager.reload()

    def wait(self) -> None:
        """Block until the asynchronous save in flight is written; a failure raises."""
        self._wait_for_pending()

    def close(self) -> None:
        """Wait for the save in flight (a failure raises :class:`CheckpointError`) and close."""
        try:
            self._wait_for_pending()
        finally:
            if not self._closed:
                self._closed = True
                self._manager.close()
                failures.OneLineOrbaxErrors.users -= 1
                if failures.OneLineOrbaxErrors.users == 0:
                    logging.getLogger("absl").removeFilter(failures.ORBAX_FILTER)

    # --- Restoring -------------------------------------------------------------------------

    def restore(self, abstract_state: Any, iterator=None, step: Optional[int] = None, *,
                on_corrupt: Optional[str] = None, log: Optional[Callable[[str], None]] = None):
        """Restore into the structure of ``abstract_state`` (and ``iterator``'s position).

        A train state's frozen base (``frozen``, an adapter run's) is not in checkpoints: the
        restored state has none, and the caller puts it back.

        ``step`` defaults to the latest. A damaged or unreadable checkpoint raises
        :class:`CorruptCheckpointError`, or with ``on_corrupt="fallback"`` (default: the
        manager's) and no explicit ``step``, the newest readable earlier step is restored
        instead, the data position with it, and each skipped step is reported through ``log``.
        """
        caller_state, abstract_state = abstract_state, _saved_part(abstract_state)
        on_corrupt = on_corrupt or self.on_corrupt
        if on_corrupt not in ON_CORRUPT_CHOICES:
            raise ValueError(f"on_corrupt={on_corrupt!r}; choose one of {ON_CORRUPT_CHOICES}")
        log = log or self.log
        self._wait_for_pending()
        steps = self.all_steps()
        if step is None and not steps:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        if step is not None and int(step) not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                                  f"available: {steps}")
        if step is not None or on_corrupt == "error":
            return _restored_as(caller_state, self._restore_step(
                self.latest_step() if step is None else int(step), abstract_state, iterator))
        failures = []
        for candidate in sorted(steps, reverse=True):
            try:
                state = self._restore_step(candidate, abstract_state, iterator)
            except CorruptCheckpointError as err:
                if not err.agreed:
                    raise
                failures.append(err)
                earlier = [s for s in steps if s < candidate]
                log(f"warning: checkpoint step {candidate} in {self.directory} is damaged or "
                    f"unreadable ({err.reason}); " + (
                        f"trying step {max(earlier)}" if earlier else "no earlier step left"))
                continue
            if failures:
                self._skipped_steps = [err.step for err in failures]
                self._skipped_log = log
                log(f"restored step {candidate} instead of the damaged step(s) "
                    f"{', '.join(str(s) for s in self._skipped_steps)}, which the next save "
                    f"moves aside to {os.path.join(self.directory, '<step>.corrupt')}")
            return _restored_as(caller_state, state)
        listed = "; ".join(f"step {err.step}: {err.reason}" for err in failures)
        raise CheckpointError(
            f"no readable checkpoint in {self.directory} ({listed}); restore the folder from a "
            "backup, or move it away to start the run again from scratch")

    def _corrupt(self, step: int, reason: str, agreed: bool = True) -> CorruptCheckpointError:
        """The error for a damaged ``step``: which folder, what failed, what to do."""
        folder = os.path.join(self.directory, str(step))
        earlier = [s for s in self.all_steps() if s < step]
        if not earlier:
            fix = (f"there is no earlier checkpoint: restore {folder} from a backup, or delete "
                   "it to start the run again from scratch")
        elif not agreed:
            fix = (f"delete the folder {folder} to resume from step {max(earlier)} (with several "
                   "processes, a checkpoint that only some of them fail to read is not skipped "
                   "automatically)")
        else:
            fix = (f"delete the folder {folder} to resume from step {max(earlier)}, or set "
                   "training.on_corrupt_checkpoint=\"fallback\" to skip damaged checkpoints "
                   "automatically")
        return CorruptCheckpointError(
            f"checkpoint step {step} in {self.directory} is damaged or unreadable ({reason}); "
            f"{fix}", step=step, reason=reason, agreed=agreed)

    def _read(self, step: int, **items):
        """``self._manager.restore`` of ``items``; a failure as :class:`CorruptCheckpointError`.

        With several processes, each reads its own part, and one that fails leaves the others
        inside Orbax's restore, waiting for it: no agreement is possible then, so the error is
        marked as not agreed (no fallback; this process stops, and the run with it).
        """
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as err:  # noqa: BLE001 - any failure to read the files
            failures.install_quiet_unraisable_hook()  # in case another hook replaced it since
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", r"coroutine .* was never awaited",
                                        RuntimeWarning)
                gc.collect()  # the coroutines of the abandoned reads, through that hook now
            raise self._corrupt(step, failures.reason(err), agreed=jax.process_count() == 1) from err

    def _restore_step(self, step: int, abstract_state: Any, iterator):
        """Restore one step: fingerprint check, state, checksums, then the data position."""
        where = os.path.join(self.directory, str(step))
        meta = self._read(step, meta=ocp.args.JsonRestore())["meta"]
        integrity = meta.pop(_INTEGRITY_KEY, None) if isinstance(meta, dict) else None
        meta_ok = integrity is None or (
            isinstance(integrity, dict)
            and integrity.get("crc32") == integrity_lib.meta_crc32(meta, integrity.get("arrays")))
        if not _all_processes_agree(meta_ok):
            raise self._corrupt(step, f"its metadata file {os.path.join(where, 'meta')} is "
                                "damaged (it does not match its checksum)")
        meta = _flat(_align(meta, self.fingerprint, self.fingerprint_defaults))
        current = _flat(self.fingerprint)
        if meta != current:
            differing = sorted(k for k in set(meta) | set(current)
                               if meta.get(k, _MISSING) != current.get(k, _MISSING))
            details = ", ".join(f"{k}: checkpoint {meta.get(k, _MISSING)!r} vs config "
                                f"{current.get(k, _MISSING)!r}" for k in differing)
            raise CheckpointError(
                f"checkpoint {where} was written for a different model or data ({details}); "
                "use the config it was trained with, or a fresh workdir"
            )
        if iterator is not None:
            _check_process_count(where)
            _check_worker_count(where, iterator)
        target = jax.tree_util.tree_map(_restore_target, abstract_state)
        state = self._read(step, state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))["state"]
        self._verify(step, state, integrity)
        if iterator is not None:
            # Only once the state is known good, so the data position is always the same step's.
            self._read(step, data=grain.PyGrainCheckpointRestore(iterator))
        return state

    def _verify(self, step: int, state: Any, integrity: Any) -> None:
        """Compare the restored arrays with the checksums saved with them (if there are any).

        Checkpoints written before checksums existed, or with another algorithm, are not
        checked. An array restored with another shape or dtype than saved is skipped too.
        """
        if not isinstance(integrity, dict) or integrity.get("algorithm") != _CHECKSUM_ALGORITHM:
            return
        saved = integrity.get("arrays") or {}
        leaves = {path: leaf for path, leaf in integrity_lib.array_leaves(state).items()
                  if isinstance(saved.get(path), dict)
                  and saved[path].get("dtype") == str(leaf.dtype)
                  and list(saved[path].get("shape", [])) == list(leaf.shape)}
        computed = integrity_lib.checksums(leaves) if leaves else {}
        bad = [path for path in leaves if computed[path]["checksum"] != saved[path]["checksum"]]
        # Every process decides the same (small arrays are checked on each process's own copy).
        if _all_processes_agree(not bad):
            return
        names = (", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
                 if bad else "an array another process holds")
        raise self._corrupt(
            step, f"the data of {names} does not match the checksum saved with it: a file "
            f"under {os.path.join(self.directory, str(step), 'state')} changed on disk")
