"""Orbax checkpoints of the train state and the data iterator.

Each checkpoint is checked to belong to the current config. Loading never executes code from the
files (Orbax/tensorstore arrays and JSON only), and a crash mid-save leaves the previous checkpoint
intact (Orbax commits a step only once all of it is written)."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

import grain.python as grain
import jax
import orbax.checkpoint as ocp

__all__ = ["CheckpointError", "Checkpoints"]


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


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or from a different model; the message says which."""


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


class Checkpoints:
    """Save and restore ``(TrainState, data iterator)`` under ``directory/<step>``.

    ``fingerprint`` (a JSON-able dict: the model config and the data shape) is stored with each
    step; restoring under a different fingerprint raises :class:`CheckpointError` listing the keys
    that differ instead of failing later with an array-shape traceback.
    """

    def __init__(self, directory: str, *, fingerprint: dict, max_to_keep: int = 3,
                 asynchronous: bool = True, fingerprint_defaults: Optional[dict] = None):
        self.directory = os.path.abspath(directory)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # normalise tuples to lists
        # Values assumed for keys a checkpoint's fingerprint lacks (keys added to the config
        # after it was written), so older checkpoints of the same model still restore.
        self.fingerprint_defaults = json.loads(json.dumps(fingerprint_defaults or {}))
        # The state goes through a PyTreeCheckpointHandler with this module's type handlers
        # (StandardCheckpointHandler, a thin wrapper of it, takes none); the files are the same
        # either way, so checkpoints written through StandardSave restore too.
        state_handler = ocp.PyTreeCheckpointHandler(
            type_handler_registry=_type_handler_registry())
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add("state", ocp.args.PyTreeSave, state_handler)
        registry.add("state", ocp.args.PyTreeRestore, state_handler)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True,
                enable_async_checkpointing=asynchronous,
            ),
            handler_registry=registry,
        )

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self):
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, iterator=None) -> None:
        items = {"state": ocp.args.PyTreeSave(state),
                 "meta": ocp.args.JsonSave(self.fingerprint)}
        if iterator is not None:
            items["data"] = grain.PyGrainCheckpointSave(iterator)
        self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def restore(self, abstract_state: Any, iterator=None, step: Optional[int] = None):
        """Restore into the structure of ``abstract_state`` (and ``iterator``'s position)."""
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        if step not in self.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                                  f"available: {self.all_steps()}")
        where = os.path.join(self.directory, str(step))
        try:
            meta = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:
            raise CheckpointError(
                f"checkpoint {where} is unreadable ({type(err).__name__}: {err}); delete that "
                "step's folder to fall back to an earlier one, or use a fresh workdir"
            ) from err
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
        target = jax.tree_util.tree_map(_restore_target, abstract_state)
        items = {"state": ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))}
        if iterator is not None:
            _check_process_count(where)
            _check_worker_count(where, iterator)
            items["data"] = grain.PyGrainCheckpointRestore(iterator)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as err:
            raise CheckpointError(
                f"checkpoint {where} is unreadable ({type(err).__name__}: {err}); delete that "
                "step's folder to fall back to an earlier one, or use a fresh workdir"
            ) from err
        return restored["state"]
