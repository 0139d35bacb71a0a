"""Host-local batches through grain: deterministic for a seed, sharded per process, resumable.

``make_iterator(source, batch_size=..., seed=...)`` returns an iterator of numpy batches
``{"x": float32 [-1, 1] NHWC (or vectors), "label": int32}`` whose position can be saved with
``get_state()`` and restored with ``set_state()``, so a resumed run reads exactly the examples an
uninterrupted one would have.
"""

from __future__ import annotations

from typing import Optional

import grain.python as grain
import numpy as np

__all__ = ["ToModelInputs", "make_iterator"]


class ToModelInputs(grain.MapTransform):
    """uint8 images -> float32 in [-1, 1] under ``x`` (NHWC; grayscale keeps its channel axis);
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
            from diffusion_jax import text

            tokens, mask = text.encode([str(record["caption"])], self.max_length)
            out["tokens"], out["token_mask"] = tokens[0], mask[0]
        return out


class _ProcessSlice:
    """Process ``index`` of ``count``'s share of a global sampler: the ``index``-th contiguous
    slice of every global batch of ``count * local_batch`` records. Together the processes read
    each global batch exactly once, in the order a single process would, so a run's batches do
    not depend on how many processes feed it (and each process reads only its own records)."""

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
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=grain.NoSharding(),
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed,
    )
    if shard_count > 1:
        sampler = _ProcessSlice(sampler, batch_size, shard_index, shard_count)
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[ToModelInputs(max_length), grain.Batch(batch_size, drop_remainder=True)],
        worker_count=worker_count,
        shard_options=grain.NoSharding(),
    )
    return iter(loader)
