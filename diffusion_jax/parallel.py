"""Device mesh and sharding rules: one code path from one CPU to a pod.

The mesh has two axes, ``data`` and ``fsdp``. The batch is split over both. A parameter (and the
optimizer moments and EMA copy of the same shape) is split over ``fsdp`` along its largest axis
that divides evenly when it is large enough to be worth it, and is replicated otherwise; with
``fsdp = 1`` everything is replicated and the mesh is plain data parallelism. ``jax.jit`` with
these shardings lets XLA insert the all-gathers and reduce-scatters.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["AXES", "MeshError", "mesh_shape", "make_mesh", "batch_sharding", "replicated",
           "state_shardings", "global_batch"]

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
    try:
        from jax.experimental import mesh_utils  # topology-aware device order on GPU/TPU

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # unusual device sets: fall back to the given order
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


def state_shardings(mesh: Mesh, abstract_state: Any, *, min_size: int = FSDP_MIN_SIZE) -> Any:
    """Shardings for every leaf of a (train) state, from its shapes alone, so that parameters,
    their EMA and their optimizer moments are split the same way."""
    return jax.tree_util.tree_map(lambda x: _leaf_sharding(mesh, tuple(x.shape), min_size),
                                  abstract_state)


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Assemble each process's numpy batch into global ``jax.Array``s split over the mesh."""
    sharding = batch_sharding(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
