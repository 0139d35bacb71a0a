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

Data a run cannot use is refused with :class:`~diffusion_jax.data.DataError` before training
compiles: :func:`make_iterator` checks the source's size and first record (:func:`check_source`),
and :func:`check_first_batch` checks the first batch a run reads (:func:`check_batch`).
"""

from __future__ import annotations

import json
from typing import Optional

import grain.python as grain
import numpy as np

from diffusion_jax import text
from diffusion_jax.data.sources import DataError

__all__ = ["ToModelInputs", "check_batch", "check_first_batch", "check_source", "make_iterator"]

# Images in the model's range [-1, 1] may miss it by this much (float rounding of a scaling).
_RANGE_TOLERANCE = 1e-3


class ToModelInputs(grain.MapTransform):
    """Turns a source's records into the model's inputs.

    uint8 images -> float32 in [-1, 1] under ``x`` (NHWC; grayscale keeps its channel axis);
    uint8 videos ``video`` [frames, H, W, C] likewise; audio ``audio`` (float waveforms in
    [-1, 1], [length, channels]) and vector data (``x``; sets [members, 3 + features]) pass
    through as float32, a set's ``mask`` of present members becomes ``node_mask`` (float32);
    labels become int32; captions become byte tokens
    ``tokens`` (int32 [max_length]) and ``token_mask`` (bool) through
    :func:`diffusion_jax.text.encode`, or through ``tokenizer(texts) -> (tokens, mask)`` when
    one is given (a pretrained model's, e.g. a CLIP tokenizer's ``token_inputs``). A control map
    (``control``, uint8 [H, W, C] from :class:`~diffusion_jax.data.controls.WithControl`) becomes
    float32 in [0, 1] under ``control``: ControlNets take control images in [0, 1], as
    diffusers' pipelines give them, not in the images' [-1, 1]."""

    def __init__(self, max_length: int = 96, tokenizer=None):
        self.max_length = max_length
        self.tokenizer = tokenizer

    def map(self, record):
        out = {}
        if "image" in record:
            image = np.asarray(record["image"])
            if image.ndim == 2:
                image = image[..., None]
            out["x"] = image.astype(np.float32) / 127.5 - 1.0
        elif "video" in record:
            out["x"] = np.asarray(record["video"]).astype(np.float32) / 127.5 - 1.0
        elif "audio" in record:
            out["x"] = np.asarray(record["audio"], np.float32)
        elif "moments" in record:  # precomputed latents: the posterior's mean and log-variance
            out["moments"] = np.asarray(record["moments"], np.float32)
        else:
            out["x"] = np.asarray(record["x"], np.float32)
        if "label" in record:
            out["label"] = np.int32(record["label"])
        if "mask" in record:  # the present members of a set (atoms of a molecule)
            out["node_mask"] = np.asarray(record["mask"], np.float32)
        if "control" in record:
            out["control"] = _unit_control(record["control"])
        if "caption" in record:
            if self.tokenizer is None:
                tokens, mask = text.encode([str(record["caption"])], self.max_length)
            else:
                tokens, mask = self.tokenizer([str(record["caption"])])
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
        elif "video" in records:
            out["x"] = np.asarray(records["video"]).astype(np.float32) / 127.5 - 1.0
        elif "audio" in records:
            out["x"] = np.asarray(records["audio"], np.float32)
        elif "moments" in records:
            out["moments"] = np.asarray(records["moments"], np.float32)
        else:
            out["x"] = np.asarray(records["x"], np.float32)
        if "label" in records:
            out["label"] = np.asarray(records["label"]).astype(np.int32)
        if "mask" in records:
            out["node_mask"] = np.asarray(records["mask"], np.float32)
        if "control" in records:
            out["control"] = _unit_control(records["control"])
        return out


def _unit_control(control) -> np.ndarray:
    """A uint8 control map (or a batch of them) as float32 in [0, 1]."""
    control = np.asarray(control)
    if control.dtype != np.uint8:
        raise DataError(f"a record's 'control' is {_describe(control)}; control maps must be "
                        "uint8 0..255 (diffusion_jax.data.controls.control_map makes them)")
    return control.astype(np.float32) / 255.0


def _describe(values: np.ndarray) -> str:
    """``float64 of shape (28, 28) in [0.0, 1.0]``: what an array holds, for a message."""
    out = f"{values.dtype} of shape {values.shape}"
    if values.size and values.dtype.kind in "iufb":
        out += f" in [{values.min()}, {values.max()}]"
    return out


def check_source(source, *, dataset: Optional[str] = None) -> None:
    """Raise :class:`DataError` unless ``source[0]`` is a record the pipeline can turn into inputs.

    Cheap: only the first record is read. Images must be uint8 (pixels 0..255, which
    :class:`ToModelInputs` scales to [-1, 1]), HW or HWC with 1 or 3 channels; vectors ``x``
    numeric and finite; a ``label`` one integer; a ``control`` map uint8 [H, W, C] of its
    image's size. ``dataset`` names the data in the message (default ``repr(source)``).
    :func:`make_iterator` calls it.
    """
    dataset = dataset or repr(source)
    record = source[0]
    kinds = ("image", "video", "audio", "x", "moments")
    if not hasattr(record, "keys") or not any(k in record for k in kinds):
        found = (f"has the keys {sorted(record)}" if hasattr(record, "keys") else
                 f"is a {type(record).__name__}")
        raise DataError(f"{dataset}: a record must be a dict with an 'image' (uint8 HWC), "
                        "'video' (uint8 [frames, H, W, C]), 'audio' (float [length, channels]) "
                        f"or 'x' (float vector) entry; record 0 {found}")
    if "video" in record or "audio" in record:
        _check_clip(record, dataset)
    elif "image" in record:
        image = np.asarray(record["image"])
        if image.dtype != np.uint8:
            scale = (" (it looks like floats in [0, 1]: give np.round(image * 255)"
                     ".astype(np.uint8))" if image.dtype.kind == "f" and image.size
                     and 0 <= image.min() and image.max() <= 1 else "")
            raise DataError(
                f"{dataset}: record 0's image is {_describe(image)}, but sources must give "
                "uint8 pixels 0..255 (the pipeline scales them to [-1, 1]); convert the "
                f"source's images to uint8{scale}")
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3))):
            raise DataError(
                f"{dataset}: record 0's image has shape {image.shape}, but images must be "
                "[height, width] or [height, width, channels] with 1 (grayscale) or 3 (RGB) "
                "channels; move a leading channel axis last (np.moveaxis(image, 0, -1)) or "
                "drop an alpha channel (image[..., :3])")
    else:
        x = np.asarray(record["x" if "x" in record else "moments"])
        if x.dtype.kind not in "iuf" or not np.all(np.isfinite(x)):
            raise DataError(f"{dataset}: record 0's 'x' is {_describe(x)}; vector data must be "
                            "finite numbers (float32)")
    if "control" in record:
        _check_control(np.asarray(record["control"]), record, dataset)
    if "label" in record:
        label = np.asarray(record["label"])
        if label.dtype.kind not in "iu" or label.ndim != 0:
            raise DataError(
                f"{dataset}: record 0's label is {_describe(label)}, but a label must be one "
                "integer class index (not one-hot, not a float); convert the source's labels")


def _check_clip(record, dataset: str) -> None:
    """Raise :class:`DataError` unless record 0's video or audio is what the pipeline takes."""
    if "video" in record:
        video = np.asarray(record["video"])
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] not in (1, 3):
            raise DataError(f"{dataset}: record 0's video is {_describe(video)}, but videos must "
                            "be uint8 0..255 of shape [frames, height, width, channels] with 1 or "
                            "3 channels (the pipeline scales them to [-1, 1])")
        return
    audio = np.asarray(record["audio"])
    if (audio.dtype.kind != "f" or audio.ndim != 2 or not np.all(np.isfinite(audio))
            or (audio.size and np.abs(audio).max() > 1)):
        raise DataError(f"{dataset}: record 0's audio is {_describe(audio)}, but audio must be "
                        "finite float samples in [-1, 1] of shape [length, channels] (e.g. "
                        "int16 PCM divided by 32768, with a channel axis: wave[:, None])")


def _check_control(control: np.ndarray, record, dataset: str) -> None:
    """Raise :class:`DataError` unless record 0's control map is uint8 [H, W, C] of its image."""
    size = np.shape(record["image"])[:2] if "image" in record else None
    if (control.dtype != np.uint8 or control.ndim != 3 or control.shape[-1] not in (1, 3)
            or (size is not None and control.shape[:2] != size)):
        expected = f"[{size[0]}, {size[1]}, 3]" if size is not None else "[H, W, 3]"
        raise DataError(f"{dataset}: record 0's control is {_describe(control)}, but a control "
                        f"map must be uint8 {expected}, the size of its image (make it with "
                        "diffusion_jax.data.controls.control_map)")


def check_batch(batch, *, num_classes: Optional[int], dataset: str, sets: bool = False) -> None:
    """Raise :class:`DataError` if a batch of model inputs is not what training expects.

    ``batch`` is what :func:`make_iterator` yields (after :class:`ToModelInputs`): ``x`` float32
    and finite, images (rank >= 3 with the batch axis) within [-1, 1]; ``label`` int32 in
    ``[0, num_classes)`` when ``num_classes`` is not None (a class-conditional model, which
    would otherwise look up a wrong or clamped embedding without an error); ``tokens`` int32 and
    ``token_mask`` bool of the same shape; ``control`` float32 in [0, 1], one per example.
    ``dataset`` names the data in the messages; ``sets`` says the examples are sets of points
    (positions in their own units, not pixels: no range). Meant for the first batch of a run
    (:func:`check_first_batch`); it reads the whole batch.
    """
    if "x" not in batch and "moments" not in batch:
        raise DataError(f"{dataset}: the batch has no 'x' (keys {sorted(batch)}); the source's "
                        "records need an 'image' or 'x' entry")
    latents = "x" not in batch  # precomputed latents: any finite values
    x = np.asarray(batch["moments"] if latents else batch["x"])
    if x.dtype != np.float32:
        raise DataError(f"{dataset}: batch 'x' is {x.dtype}, expected float32 (ToModelInputs "
                        "makes it so: build batches with make_iterator)")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{dataset}: the batch holds {int(np.sum(~np.isfinite(x)))} NaN or "
                        "infinite values in 'x'; the source gives non-finite data: fix or "
                        "filter those records")
    if x.ndim >= 3 and not latents and not sets:  # images (audio, video): the model's range
        low, high = float(x.min()), float(x.max())
        if low < -1 - _RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
            raise DataError(
                f"{dataset}: the batch's images lie in [{low:g}, {high:g}], outside the model's "
                "[-1, 1]: the source gave pixels that are not uint8 0..255 (e.g. floats or "
                "16-bit values) or scaled them already; make the source give uint8 images")
    if "label" in batch:
        labels = np.asarray(batch["label"])
        if labels.dtype != np.int32 or labels.shape != x.shape[:1]:
            raise DataError(f"{dataset}: batch 'label' is {labels.dtype} of shape "
                            f"{labels.shape}, expected int32 of shape {x.shape[:1]} (one class "
                            "index per example)")
        if num_classes is not None:
            bad = labels[(labels < 0) | (labels >= num_classes)]
            if bad.size:
                value = int(bad[0])
                advice = ("negative labels often mark unlabelled examples: set "
                          "config.data.class_conditional=False to train without labels, or "
                          "drop those records" if value < 0 else
                          f"the data has more classes than num_classes={num_classes} (the "
                          "source's num_classes): fix the labels or the source's num_classes")
                raise DataError(
                    f"{dataset}: the batch has the label {value}, outside [0, {num_classes}); "
                    + advice)
    elif num_classes is not None:
        raise DataError(f"{dataset}: the model is class-conditional (num_classes={num_classes}) "
                        "but the batch has no 'label'; set config.data.class_conditional=False "
                        "or give the records labels")
    if "control" in batch:
        control = np.asarray(batch["control"])
        if (control.dtype != np.float32 or control.shape[:1] != x.shape[:1]
                or not np.all((control >= 0) & (control <= 1))):
            raise DataError(f"{dataset}: batch 'control' is {_describe(control)}, expected "
                            f"float32 in [0, 1] with {x.shape[0]} rows (ToModelInputs makes it "
                            "so from uint8 control maps: build batches with make_iterator)")
    if "tokens" in batch or "token_mask" in batch:
        tokens = np.asarray(batch.get("tokens"))
        mask = np.asarray(batch.get("token_mask"))
        if tokens.dtype != np.int32 or mask.dtype != np.bool_ or tokens.shape != mask.shape:
            raise DataError(f"{dataset}: batch 'tokens' is {tokens.dtype} {tokens.shape} and "
                            f"'token_mask' {mask.dtype} {mask.shape}; expected int32 and bool of "
                            "the same shape [batch, max_length] (from text.encode)")


class _FirstBatchChecked:
    """An iterator that runs ``check`` on the first batch it yields, then passes batches through.

    Everything else (``get_state``, ``set_state``, ``start_prefetch``) is the wrapped iterator's,
    so checkpoints save and restore the same position."""

    def __init__(self, iterator, check):
        self._iterator, self._check = iterator, check

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._iterator)
        if self._check is not None:
            check, self._check = self._check, None
            check(batch)
        return batch

    def __getattr__(self, name):
        if name == "_iterator":  # not set yet (e.g. while copying): no recursion
            raise AttributeError(name)
        return getattr(self._iterator, name)


def check_first_batch(iterator, *, num_classes: Optional[int], dataset: str,
                      sets: bool = False):
    """``iterator`` that runs :func:`check_batch` on the first host batch it yields.

    Wrap the iterator of :func:`make_iterator` before it is restored or prefetched; it keeps its
    ``get_state``/``set_state``, so checkpoints are unchanged."""
    return _FirstBatchChecked(iterator, lambda batch: check_batch(
        batch, num_classes=num_classes, dataset=dataset, sets=sets))


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
    tokenizer=None,
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

    A source with fewer records than one global batch, or whose first record is not one the
    pipeline can use (:func:`check_source`), raises :class:`DataError`; the other errors here
    are a caller's mistakes (``ValueError``).
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
        processes = f" ({shard_count} processes x {batch_size})" if shard_count > 1 else ""
        raise DataError(
            f"{source!r} has {len(source)} records, too few for one batch of "
            f"{batch_size * shard_count}{processes}: lower the batch size "
            "(config.data.batch_size; config.classifier.batch_size for --mode=train_classifier) "
            f"to at most {len(source)}, or use more data (for procedural data a larger "
            "config.data.size)"
        )
    check_source(source)
    sampler = _make_sampler(len(source), shuffle=shuffle, seed=seed, num_epochs=num_epochs)
    if shard_count > 1:
        sampler = _ProcessSlice(sampler, batch_size, shard_index, shard_count)
    transform = ToModelInputs(max_length, tokenizer)
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
