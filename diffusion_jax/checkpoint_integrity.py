"""Checksums of a checkpoint's arrays, computed where the arrays are and compared on restore.

Each array's bits are read as 32-bit words (narrower types widened, 64-bit ones split), and two
32-bit sums are kept: a plain one, which any single flipped bit changes, and one weighted by
position, which words that moved change. They do not depend on how an array is split over
devices. Small arrays are summed on the host, large ones by one jitted function on their own
devices (never gathered).
"""

from __future__ import annotations

import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

__all__ = ["array_leaves", "checksums", "meta_crc32", "state_bytes", "HOST_CHECKSUM_BYTES"]


def _sub_byte(dtype) -> bool:
    """Whether ``dtype`` packs fewer bits than its itemsize (int4, float4)."""
    info = jnp.finfo(dtype) if jnp.issubdtype(dtype, jnp.floating) else jnp.iinfo(dtype)
    return info.bits != jnp.dtype(dtype).itemsize * 8


def _words(x):
    """The bit pattern of ``x`` as uint32 words (64-bit types: a trailing axis of two words)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([x.real, x.imag], axis=-1)
    if _sub_byte(x.dtype):  # their values, exactly, in a wider type
        wide = jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else jnp.int32
        x = x.astype(wide)
    bits = jnp.dtype(x.dtype).itemsize * 8
    if bits < 32:
        return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _words_on_host(x: np.ndarray) -> np.ndarray:
    """:func:`_words` of a host array, word for word the same."""
    if x.dtype == np.bool_:
        x = x.astype(np.uint8)
    if np.iscomplexobj(x):
        x = np.stack([x.real, x.imag], axis=-1)
    if _sub_byte(x.dtype):
        x = x.astype(np.float32 if jnp.issubdtype(x.dtype, jnp.floating) else np.int32)
    x = np.ascontiguousarray(x)
    bits = x.dtype.itemsize * 8
    if bits < 32:
        return x.reshape(-1).view(f"uint{bits}").astype(np.uint32).reshape(x.shape)
    return x.reshape(-1).view(np.uint32).reshape(x.shape + ((2,) if bits == 64 else ()))


def _leaf_sums(x):
    """Two uint32 sums over ``x``'s words: plain, and weighted by (flat position + 1).

    Integer sums wrap exactly, in any order, so the result does not depend on how the array is
    sharded or over how many devices it is reduced. Any single flipped bit changes the plain sum;
    the weighted one also catches words that moved. No reshape: a sharded array stays in place.
    """
    words = _words(x)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        index = index + (jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
                         * jnp.uint32(stride % 2**32))
        stride *= words.shape[axis]
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32),
                      jnp.sum(words * (index + jnp.uint32(1)), dtype=jnp.uint32)])


def _leaf_sums_on_host(x: np.ndarray) -> tuple:
    """:func:`_leaf_sums` of a host array (numpy's uint32 arithmetic wraps the same way)."""
    words = _words_on_host(x).reshape(-1)
    weights = (np.arange(1, words.size + 1, dtype=np.uint64) % 2**32).astype(np.uint32)
    return np.sum(words, dtype=np.uint32), np.sum(words * weights, dtype=np.uint32)


@jax.jit
def _group_sums(leaves):
    """The sums of each leaf (all on the same devices), as one ``[len(leaves), 2]`` array."""
    return jnp.stack([_leaf_sums(x) for x in leaves])


def _to_host(array) -> np.ndarray:
    """A small result of a jitted function on the host, also when it spans several processes."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(jax.device_get(array))
    if array.is_fully_replicated:
        return np.asarray(array.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


# Checksums of small arrays are computed on the host (up to this many bytes in all, smallest
# first): a jitted reduction per array would compile hundreds of kernels for the biases and
# norms of a model, for arrays that take no time to copy. Larger arrays are reduced where they
# are, so a big or sharded state is read once on its devices and never gathered.
HOST_CHECKSUM_BYTES = 64 * 2**20


def _nbytes(leaf) -> int:
    """The bytes of an array or ``ShapeDtypeStruct`` (PRNG keys: their key data)."""
    return int(np.prod(leaf.shape, dtype=np.int64)) * leaf.dtype.itemsize


def _on_host(leaf):
    """``leaf`` whole on one device or the host (None where no process holds all of it)."""
    if isinstance(leaf, np.ndarray):
        return leaf
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return None
    if leaf.is_fully_addressable:
        return leaf
    return leaf.addressable_data(0) if leaf.is_fully_replicated else None


def array_leaves(tree) -> dict:
    """The array leaves of ``tree`` by their path (``params['conv_in']['kernel']``)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, (jax.Array, np.ndarray)):
            out[jax.tree_util.keystr(path).lstrip(".")] = leaf
    return out


def checksums(leaves: dict) -> dict:
    """``{path: {"dtype", "shape", "checksum"}}`` for array leaves.

    Small leaves are summed on the host (see ``HOST_CHECKSUM_BYTES``), the rest where they
    live: one jitted call per set of devices (a train state is one), of which only two words
    per leaf travel to the host. Every process takes the same choices (they depend on global
    shapes and shardings only), as the jitted calls over arrays that span processes require.
    """
    host, budget = {}, HOST_CHECKSUM_BYTES
    for path in sorted(leaves, key=lambda p: (_nbytes(leaves[p]), p)):
        whole = _on_host(leaves[path])
        if whole is not None and _nbytes(whole) <= budget:
            host[path], budget = whole, budget - _nbytes(whole)
    sums = dict(zip(host, (_leaf_sums_on_host(np.asarray(x))
                           for x in jax.device_get(list(host.values())))))
    groups: dict = {}
    for path, leaf in leaves.items():
        if path not in host:
            sharding = getattr(leaf, "sharding", None)
            key = None if sharding is None else frozenset(d.id for d in sharding.device_set)
            groups.setdefault(key, []).append(path)
    for paths in groups.values():
        sums.update(zip(paths, _to_host(_group_sums([leaves[p] for p in paths]))))
    out = {}
    for path, leaf in leaves.items():
        plain, weighted = sums[path]
        out[path] = {"dtype": str(leaf.dtype), "shape": list(leaf.shape),
                     "checksum": f"{int(plain):08x}{int(weighted):08x}"}
    return out


def meta_crc32(fingerprint, arrays) -> int:
    """A CRC-32 of the fingerprint and the array checksums, to tell a damaged metadata file.

    Without it, a flipped bit there would read as another model or as a damaged array."""
    text = json.dumps({"fingerprint": fingerprint, "arrays": arrays}, sort_keys=True)
    return zlib.crc32(text.encode())


def state_bytes(tree) -> int:
    """The bytes of the arrays of ``tree`` (arrays or ``jax.ShapeDtypeStruct`` leaves)."""
    return sum(_nbytes(leaf) for leaf in jax.tree_util.tree_leaves(tree)
               if hasattr(leaf, "shape") and hasattr(leaf, "dtype"))


# --- Describing failures ---------------------------------------------------------------------
