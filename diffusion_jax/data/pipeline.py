"""Host-local batches through grain: deterministic for a seed, sharded per process, resumable.

``make_iterator(source, batch_size=..., seed=...)`` returns an iterator of numpy batches
``{"x": float32 [-1, 1] NHWC (or vectors), "label": int32}`` whose position can be saved with
``get_state()`` and restored with ``set_state()``, so a resumed run reads exactly the examples an
uninterrupted one would have.

Reading is where the host's time goes, not the arithmetic: Python work per record holds the
interpreter lock, so grain's threaded reader (16 threads by default) only adds contention for
sources computed in memory (Fashion-MNIST's arrays, the procedural datasets), which are read in
the calling thread instead, and a source whose records are rows of arrays (``read_batch``) is
read a whole batch at a time with the same order, values and saved positions as grain's loader.
"""

from __future__ import annotations

import json
from typing import Optional

import grain.python as grain
import numpy as np

from diffusion_jax import text

__all__ = ["ToModelInputs", "make_iterator"]


class ToModelInputs(grain.MapTransform):
    """Turns a source's records into the model's inputs.

    uint8 images -> float32 in [-1, 1] under ``x`` (NHWC; grayscale keeps its channel axis);
    vector data (``x``) passes through; labels become int32; captions become byte tokens
    ``tokens`` (int32 [max_length]) and ``token_mask`` (bool) through
    :func:`diffusion_jax.text.encode`."""

    def __init__(self, max_length: int = 96):
        self.max_length = max_length

    def map(self, record):
        out = {}
        if "image" in record:
            image = np.asarray(record["image"])
            if image.ndim == 2:
                image = image[..., None]
            out["x"] = image.astype(np.float32) / 127.5 - 1.0
        else:
            out["x"] = np.asarray(record["x"], np.float32)
        if "label" in record:
            out["label"] = np.int32(record["label"])
        if "caption" in record:
            tokens, mask = text.encode([str(record["caption"])], self.max_length)
            out["tokens"], out["token_mask"] = tokens[0], mask[0]
        return out

    def map_batch(self, records):
        """:meth:`map` of a batch of records given as arrays with a leading batch axis.

        That is what a source's ``read_batch`` returns; the same values as mapping each row and
        stacking."""
        if "caption" in records:
            raise NotImplementedError("captions are encoded record by record (map)")
        out = {}
        if "image" in records:
            images = np.asarray(records["image"])
            if images.ndim == 3:
                images = images[..., None]
            out["x"] = images.astype(np.float32) / 127.5 - 1.0
        else:
            out["x"] = np.asarray(records["x"], np.float32)
        if "label" in records:
            out["label"] = np.asarray(records["label"]).astype(np.int32)
        return out


class _RecordKeys:
    """grain's ``IndexSampler`` (shuffled, no sharding) without its per-record random generator.

    grain's sampler builds a ``np.random.Generator(Philox)`` for every record, which only random
    transforms use; none of this pipeline's transforms draw. The same record keys for every index,
    epochs included, and the same ``repr``, which grain stores with a saved position and checks on
    restore, so positions saved with either restore into the other."""

    def __init__(self, num_records: int, *, shuffle: bool, seed: int,
                 num_epochs: Optional[int]):
        self._reference = grain.IndexSampler(num_records=num_records,
                                             shard_options=grain.NoSharding(), shuffle=shuffle,
                                             num_epochs=num_epochs, seed=seed)
        keys = grain.MapDataset.range(num_records)
        self._keys = keys.shuffle(seed=seed) if shuffle else keys
        self._max_index = None if num_epochs is None else num_epochs * num_records

    def __getitem__(self, index):
        if index < 0 or (self._max_index is not None and index >= self._max_index):
            raise IndexError(f"sampler index {index} is outside [0, {self._max_index})")
        return grain.RecordMetadata(index=index, record_key=int(self._keys[index]), rng=None)

    def __repr__(self):
        return repr(self._reference)


def _make_sampler(num_records, *, shuffle, seed, num_epochs):
    """The sampler of a pipeline: :class:`_RecordKeys` where it matches grain's, else grain's own.

    :class:`_RecordKeys` is used where this grain version builds its ``IndexSampler`` that way (a
    test compares them)."""
    if hasattr(grain, "MapDataset") and hasattr(grain, "RecordMetadata"):
        return _RecordKeys(num_records, shuffle=shuffle, seed=seed, num_epochs=num_epochs)
    return grain.IndexSampler(num_records=num_records, shard_options=grain.NoSharding(),
                              shuffle=shuffle, num_epochs=num_epochs, seed=seed)


class _ProcessSlice:
    """Process ``index`` of ``count``'s share of a global sampler.

    The ``index``-th contiguous slice of every global batch of ``count * local_batch`` records.
    Together the processes read each global batch exactly once, in the order a single process would,
    so a run's batches do not depend on how many processes feed it (and each process reads only its
    own records)."""

    def __init__(self, sampler, local_batch: int, index: int, count: int):
        self._sampler, self._local_batch = sampler, local_batch
        self._index, self._count = index, count
        self._shard_options = grain.NoSharding()

    def __getitem__(self, n):
        batch, position = divmod(n, self._local_batch)
        return self._sampler[(batch * self._count + self._index) * self._local_batch + position]

    def __repr__(self):
        return (f"_ProcessSlice({self._sampler!r}, local_batch={self._local_batch}, "
                f"index={self._index}, count={self._count})")


class _BatchIterator:
    """Batches of a source whose records are rows of arrays, one ``read_batch(keys)`` per batch.

    ``read_batch`` uses fancy indexing. It yields the batches grain's ``DataLoader`` (no workers,
    ``Batch`` with ``drop_remainder``) gives for the same sampler, and saves a position in the same
    format as its, so checkpoints written with either restore into the other."""

    _VERSION = 2  # grain DataLoader's state format without workers

    def __init__(self, source, sampler, batch_size: int, transform: ToModelInputs):
        self._source, self._sampler = source, sampler
        self._batch_size, self._transform = batch_size, transform
        self._next = 0  # the sampler index of the next record

    def __iter__(self):
        return self

    def __next__(self):
        try:
            keys = [self._sampler[i].record_key
                    for i in range(self._next, self._next + self._batch_size)]
        except IndexError:  # the last epoch ended; a partial batch is dropped
            raise StopIteration from None
        self._next += self._batch_size
        return self._transform.map_batch(self._source.read_batch(np.asarray(keys)))

    def get_state(self) -> bytes:
        return json.dumps({"version": self._VERSION,
                           "last_seen_indices": {"0": self._next - 1},
                           "last_worker_index": -1, "worker_count": 0,
                           "sampler": repr(self._sampler),
                           "data_source": repr(self._source)}, indent=4).encode()

    def set_state(self, state) -> None:
        state = json.loads(state)
        for key, expected in (("worker_count", 0), ("sampler", repr(self._sampler)),
                              ("data_source", repr(self._source))):
            if state.get(key) != expected:
                raise ValueError(f"the saved data position is for {key} {state.get(key)!r}, "
                                 f"this iterator has {expected!r}")
        self._next = int(state["last_seen_indices"]["0"]) + 1

    def start_prefetch(self) -> None:
        """Nothing to start (grain's checkpoint handler calls it after a restore)."""


def make_iterator(
    source,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: Optional[int] = None,
    worker_count: int = 0,
    max_length: int = 96,
    read_threads: Optional[int] = None,
):
    """A grain iterator over ``source`` yielding batches of ``batch_size`` examples.

    Each of ``shard_count`` processes reads only its own share of the records
    (``shard_index``): its contiguous slice of each global batch of ``shard_count *
    batch_size`` examples, so the global batches are those of a single process reading them all.
    ``batch_size`` is the per-process batch. With ``num_epochs=None`` the iterator never ends,
    reshuffling every epoch from ``seed``. Captions are encoded to ``max_length`` tokens.
    ``worker_count`` > 0 reads records in that many grain worker processes, each batching its
    own share of the records: still deterministic and resumable, but which examples share a batch
    depends on ``worker_count``, and a saved position restores only into an iterator with the
    same ``worker_count``.

    ``read_threads`` is the number of grain reader threads per process; by default the
    source's ``read_threads`` attribute, else 0 (read in the calling thread, best for
    records computed in memory). Without workers, a source with ``read_batch(keys)`` (Fashion-
    MNIST) is read a batch at a time instead, with the same batches and saved positions.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is outside [0, {shard_count})")
    if worker_count < 0:
        raise ValueError(f"worker_count must be >= 0, got {worker_count}")
    if worker_count:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain reads its absl flags in worker mode
            flags.FLAGS.mark_as_parsed()
    if len(source) < batch_size * shard_count:
        raise ValueError(
            f"{source!r} has {len(source)} records: too few for {shard_count} shard(s) of "
            f"batch {batch_size}"
        )
    sampler = _make_sampler(len(source), shuffle=shuffle, seed=seed, num_epochs=num_epochs)
    if shard_count > 1:
        sampler = _ProcessSlice(sampler, batch_size, shard_index, shard_count)
    transform = ToModelInputs(max_length)
    if not worker_count and hasattr(source, "read_batch"):
        return _BatchIterator(source, sampler, batch_size, transform)
    if read_threads is None:
        read_threads = getattr(source, "read_threads", 0)
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[transform, grain.Batch(batch_size, drop_remainder=True)],
        worker_count=worker_count,
        shard_options=grain.NoSharding(),
        read_options=grain.ReadOptions(num_threads=int(read_threads)),
    )
    return iter(loader)
