"""Device mesh and sharding rules: one code path from one CPU to a pod.

The mesh has two axes, ``data`` and ``fsdp``. The batch is split over both. A parameter (and the
optimizer moments and EMA copy of the same shape) is split over ``fsdp`` along its largest axis
that divides evenly when it is large enough to be worth it, and is replicated otherwise; with
``fsdp = 1`` everything is replicated and the mesh is plain data parallelism. ``jax.jit`` with
these shardings lets XLA insert the all-gathers and reduce-scatters.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["AXES", "MeshError", "mesh_shape", "make_mesh", "batch_sharding", "replicated",
           "state_shardings", "global_batch", "stacked_batch_sharding", "shard_map",
           "DevicePrefetcher", "initialize_distributed", "launched_processes", "global_norm",
           "process_batch_slot", "to_host", "is_writer", "split_axis", "JoinError",
           "join_processes"]

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
# Leaves smaller than this many elements stay replicated under fsdp: gathering them would cost
# more in latency than their memory is worth.
FSDP_MIN_SIZE = 2 ** 14


class MeshError(ValueError):
    """The mesh sizes do not fit the devices or the batch; the message says how."""


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple:
    """Resolve sizes where one may be -1 ("the rest of the devices") into ``(data, fsdp)``."""
    sizes = {"data": int(data), "fsdp": int(fsdp)}
    for name, size in sizes.items():
        if size != -1 and size < 1:
            raise MeshError(f"config.mesh.{name} must be -1 (the rest) or >= 1, got {size}")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise MeshError("at most one of config.mesh.data and config.mesh.fsdp may be -1")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise MeshError(f"{num_devices} devices do not split into config.mesh sizes "
                            f"{sizes}; choose sizes whose product divides {num_devices}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise MeshError(f"config.mesh data x fsdp = {sizes['data']} x {sizes['fsdp']} must use "
                        f"all {num_devices} devices; set one of them to -1")
    return sizes["data"], sizes["fsdp"]


def make_mesh(data: int = -1, fsdp: int = 1, devices: Optional[Sequence] = None) -> Mesh:
    """A ``Mesh`` with axes ``('data', 'fsdp')`` over ``devices`` (default: all of them)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, len(devices))
    try:  # a topology-aware device order on GPU/TPU
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception as err:  # unusual device sets: fall back to the given order
        warnings.warn(f"no topology-aware device order for a {shape[0]} x {shape[1]} mesh "
                      f"({type(err).__name__}: {err}); the devices are used in the order given")
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every mesh axis; other axes whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _leaf_sharding(mesh: Mesh, shape: tuple, min_size: int) -> NamedSharding:
    fsdp = mesh.shape["fsdp"]
    if fsdp == 1 or not shape or math.prod(shape) < min_size:
        return replicated(mesh)
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):  # largest axis first
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return NamedSharding(mesh, PartitionSpec(*spec))
    return replicated(mesh)


def parameter_sharding(mesh: Mesh, shape: Sequence[int], *,
                       min_size: int = FSDP_MIN_SIZE) -> NamedSharding:
    """Where a parameter of ``shape`` lives on ``mesh``.

    Split over ``fsdp`` along its largest divisible axis when the mesh has an fsdp axis and the
    parameter is large, else replicated (the rule of :func:`state_shardings`, for one leaf)."""
    return _leaf_sharding(mesh, tuple(shape), min_size)


def split_axis(spec: PartitionSpec) -> Optional[int]:
    """The axis of a leaf that ``spec`` (from :func:`state_shardings`) splits over ``fsdp``.

    None for a replicated leaf."""
    return next((axis for axis, name in enumerate(spec) if name == "fsdp"), None)


def state_shardings(mesh: Mesh, abstract_state: Any, *, min_size: int = FSDP_MIN_SIZE) -> Any:
    """Shardings for every leaf of a (train) state, from its shapes alone.

    Working from shapes alone splits parameters, their EMA and their optimizer moments the same
    way."""
    return jax.tree_util.tree_map(lambda x: _leaf_sharding(mesh, tuple(x.shape), min_size),
                                  abstract_state)


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of ``[steps, batch, ...]`` stacks of batches.

    The batch axis is split as in :func:`batch_sharding`, the leading (step) axis kept whole."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))


def global_norm(tree: Any, *, concat_below: float = 0) -> jax.Array:
    """The L2 norm of all the leaves of ``tree`` together, in float32.

    Leaves with fewer than ``concat_below`` elements are concatenated into one vector and reduced
    together; the others are reduced one by one. A network has hundreds of small leaves (biases,
    norm scales), and one reduction kernel each costs more in launches than copying them. The
    default 0 reduces every leaf on its own, which suits leaves sharded any way; ``math.inf``
    concatenates everything, for unsharded state (``fsdp = 1``); :data:`FSDP_MIN_SIZE` only the
    leaves that :func:`state_shardings` keeps replicated, so nothing sharded is gathered. An
    optimisation barrier keeps XLA from splitting the reduction of the concatenation back into
    one reduction per leaf.
    """
    leaves = [x.astype(np.float32) for x in jax.tree_util.tree_leaves(tree)]
    alone = [x for x in leaves if x.size >= concat_below]
    together = [x.ravel() for x in leaves if x.size < concat_below]
    total = sum((jnp.sum(jnp.square(x)) for x in alone), jnp.zeros((), np.float32))
    if together:
        vector = jax.lax.optimization_barrier(jnp.concatenate(together))
        total = total + jnp.sum(jnp.square(vector))
    return jnp.sqrt(total)


def process_batch_slot(mesh: Mesh, global_batch: int, *,
                       process_of: Optional[Callable[[Any], int]] = None,
                       process: Optional[int] = None) -> tuple:
    """Which slice of each global batch this process reads, as ``(slot, count)``.

    The rows of a global batch that the mesh puts on this process's devices are the ``slot``-th
    of ``count`` (the process count) equal contiguous slices of it, so the process reads that
    slice of each global batch and every example lands on the device a single process would put
    it on. On a pod the mesh orders devices by the physical topology, which need not follow the
    process index. Every process works this out for all of them from the mesh, so they agree:
    when some process's rows are not one such slice (an unusual device order), every slot is the
    process index, and each global batch is still read exactly once, in another arrangement.
    ``process_of(device)`` (default: its ``process_index``) and ``process`` (default: this one's
    index) let a test pose as one of several processes."""
    process_of = process_of or (lambda device: device.process_index)
    process = jax.process_index() if process is None else process
    rows = {}
    for device, where in batch_sharding(mesh).devices_indices_map((global_batch,)).items():
        rows.setdefault(process_of(device), set()).update(
            range(*where[0].indices(global_batch)))
    count = len(rows)
    if count == 1:
        return 0, 1
    local = global_batch // count
    slots = {}
    for owner, own in rows.items():
        first = min(own)
        if len(own) != local or first % local or own != set(range(first, first + local)):
            return process, count
        slots[owner] = first // local
    return slots[process], count


def to_host(x) -> np.ndarray:
    """``x`` as one numpy array on this host.

    An array spread over the devices of several processes (samples generated over a pod's mesh)
    is gathered from all of them, so every process must call this at the same point."""
    if getattr(x, "is_fully_addressable", True) or getattr(x, "is_fully_replicated", False):
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def is_writer() -> bool:
    """Whether this process writes files shared by the run (logs, sample grids, results).

    Only process 0 of several does."""
    return jax.process_index() == 0


def global_batch(local_batch: Any, mesh: Mesh, *, stacked: bool = False) -> Any:
    """Assemble each process's numpy batch into global ``jax.Array``s split over the mesh.

    With ``stacked`` the arrays are ``[steps, batch, ...]``, split along the batch axis."""
    sharding = stacked_batch_sharding(mesh) if stacked else batch_sharding(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def shard_map(fn, *, mesh: Mesh, in_specs, out_specs):
    """``jax.shard_map`` without the replication (vma) check.

    ``fn`` sees each device's block and does its own collectives; values returned under a
    replicated spec must be made equal by the function (e.g. with ``lax.pmean``)."""
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)


class DevicePrefetcher:
    """Wrap a host iterator so that the next ``size`` batches are already on the devices.

    The batches are assembled on the devices ahead of use (transfers are asynchronous and overlap
    the running step).

    ``stack`` > 1 yields ``[stack, batch, ...]`` stacks of consecutive batches (for several
    train steps per device call). ``get_state``/``set_state`` pass through to the wrapped
    iterator but report the position after the last batch *handed out*, not the ones waiting
    in the queue, so a checkpoint taken mid-run resumes exactly where training was.
    """

    def __init__(self, iterator, mesh: Mesh, *, size: int = 2, stack: int = 1):
        if size < 1 or stack < 1:
            raise ValueError(f"prefetch size and stack must be >= 1, got {size}, {stack}")
        self._iterator, self._mesh, self._size, self._stack = iterator, mesh, size, stack
        self._queue = []
        self._state = None  # position after the last batch handed out (None: nothing yet)

    def _fetch(self):
        if self._stack == 1:
            host = next(self._iterator)
        else:
            batches = [next(self._iterator) for _ in range(self._stack)]
            host = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *batches)
        position = self._iterator.get_state() if hasattr(self._iterator, "get_state") else None
        return global_batch(host, self._mesh, stacked=self._stack > 1), position

    def __iter__(self):
        return self

    def __next__(self):
        while len(self._queue) < self._size:
            self._queue.append(self._fetch())
        batch, self._state = self._queue.pop(0)
        return batch

    def get_state(self):
        return self._iterator.get_state() if self._state is None else self._state

    def set_state(self, state):
        self._iterator.set_state(state)
        self._queue, self._state = [], None


def _count(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ.get(name, "1"))
    except ValueError:
        return 1


def launched_processes(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """What in the environment says a launcher started this process as one of several, or None.

    The environment (default ``os.environ``) must say that the process is one of several of the
    same run. Only launches of several processes count: srun with more than one task
    (``SLURM_STEP_NUM_TASKS``; a batch script's own shell has no step, so a plain ``python``
    there runs alone), ``mpirun`` with more than one rank, several TPU workers listed, or a
    coordinator named through ``JAX_COORDINATOR_ADDRESS``."""
    environ = os.environ if environ is None else environ
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return f"JAX_COORDINATOR_ADDRESS={environ['JAX_COORDINATOR_ADDRESS']}"
    for name, launcher in (("SLURM_STEP_NUM_TASKS", "srun"),
                           ("OMPI_COMM_WORLD_SIZE", "mpirun")):
        count = _count(environ, name)
        if count > 1:
            return f"{launcher} started {count} processes ({name})"
    for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        workers = [w for w in environ.get(name, "").split(",") if w.strip()]
        if len(workers) > 1:
            return f"{len(workers)} TPU workers ({name})"
    return None


def initialize_distributed(coordinator_address: str = "", num_processes: int = -1,
                           process_id: int = -1, timeout_s: int = 300) -> None:
    """Join a multi-process run (several hosts of a TPU pod, or GPU nodes).

    It goes through ``jax.distributed.initialize``, before any other JAX call. Empty or -1
    arguments are left to JAX's auto-detection (Cloud TPU, SLURM, Open MPI...); on a plain
    machine give all three. ``timeout_s``: how long to wait for every process to join."""
    kwargs = {"initialization_timeout": int(timeout_s)}
    if coordinator_address:
        kwargs["coordinator_address"] = coordinator_address
    if num_processes != -1:
        kwargs["num_processes"] = int(num_processes)
    if process_id != -1:
        kwargs["process_id"] = int(process_id)
    if getattr(jax.distributed, "is_initialized", lambda: False)():
        return
    jax.distributed.initialize(**kwargs)


class JoinError(RuntimeError):
    """This process could not join its run, or joined one that others started differently."""


def join_processes(config, workdir: str, mode: str, *, log: Callable[[str], None] = print
                   ) -> None:
    """Join the other processes of this run when ``config.distributed`` or a launcher asks.

    Done before anything else touches the devices. After joining, the processes check that
    they were all given the same workdir, mode and config (but for the ``distributed`` group,
    which names each process): separate runs that one launcher started (a sweep under srun)
    must not train as one. Raises :class:`JoinError` with the fix.
    """
    d = config.distributed
    launched = launched_processes() if d.auto_detect else None
    if not (d.initialize or launched):
        return
    if launched and not d.initialize:
        log(f"joining a run of several processes: {launched} "
            "(--config.distributed.auto_detect=False runs this process alone)")
    # JAX ends the process itself when the others do not come in time.
    log(f"waiting up to {d.timeout_s} s for every process to join (config.distributed.timeout_s)")
    try:
        initialize_distributed(d.coordinator_address, d.num_processes, d.process_id, d.timeout_s)
    except (ValueError, RuntimeError) as err:
        raise JoinError(
            f"jax.distributed.initialize failed ({err}); give "
            "--config.distributed.coordinator_address (process 0's host:port), num_processes "
            "and process_id" + (", or --config.distributed.auto_detect=False to run alone"
                                if launched else "")) from err
    _check_same_run(config, workdir, mode, launched)


def _check_same_run(config, workdir, mode, launched) -> None:
    if jax.process_count() == 1:
        return
    settings = {k: v for k, v in config.to_dict().items() if k != "distributed"}
    text = json.dumps([os.path.abspath(workdir), mode, settings], sort_keys=True, default=str)
    try:
        multihost_utils.assert_equal(
            np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8))
    except AssertionError as err:
        fix = ("for separate runs started by one launcher, add "
               "--config.distributed.auto_detect=False" if launched else
               "give every process the same command")
        raise JoinError(f"the {jax.process_count()} processes of this run were not all given "
                        "the same --workdir, --mode and config, and they train one run "
                        f"together; {fix}") from err
