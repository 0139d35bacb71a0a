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
    vector data (``x``) passes through; labels become int32."""

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
        return out


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
):
    """A grain iterator over ``source`` yielding batches of ``batch_size`` examples.

    Each of ``shard_count`` processes reads only its own disjoint share of the records
    (``shard_index``); ``batch_size`` is the per-process batch. With ``num_epochs=None`` the
    iterator never ends, reshuffling every epoch from ``seed``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is outside [0, {shard_count})")
    if len(source) // shard_count < batch_size:
        raise ValueError(
            f"{source!r} has {len(source)} records: too few for {shard_count} shard(s) of "
            f"batch {batch_size}"
        )
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=grain.ShardOptions(shard_index, shard_count, drop_remainder=True),
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed,
    )
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[ToModelInputs(), grain.Batch(batch_size, drop_remainder=True)],
        worker_count=worker_count,
    )
    return iter(loader)
