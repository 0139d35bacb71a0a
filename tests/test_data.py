"""Data: IDX reading, Fashion-MNIST, procedural sources, deterministic / sharded / resumable
grain iterators, and clear errors for missing data."""

import gzip
import os

import grain.python as grain
import numpy as np
import pytest

from diffusion_jax import data
from diffusion_jax.data import pipeline


def _write_idx(path, array):
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture
def fake_fashion_mnist(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    labels = (np.arange(50) % 10).astype(np.uint8)
    _write_idx(str(tmp_path / "train-images-idx3-ubyte.gz"), images)
    _write_idx(str(tmp_path / "train-labels-idx1-ubyte"), labels)  # uncompressed works too
    return tmp_path, images, labels


def test_fashion_mnist_from_idx_files(fake_fashion_mnist):
    path, images, labels = fake_fashion_mnist
    source = data.FashionMNIST("train", path=str(path))
    assert len(source) == 50 and source.num_classes == 10
    record = source[7]
    np.testing.assert_array_equal(record["image"][..., 0], images[7])
    assert record["image"].shape == (28, 28, 1) and record["label"] == labels[7]


def test_missing_and_corrupt_data_say_what_to_do(tmp_path, fake_fashion_mnist):
    with pytest.raises(data.DataError, match="apt-get install dataset-fashion-mnist"):
        data.FashionMNIST("test", path=str(tmp_path / "nowhere"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 5)
    (bad / "train-labels-idx1-ubyte").write_bytes(b"PK\x03\x04")
    with pytest.raises(data.DataError, match="truncated|not an IDX file"):
        data.FashionMNIST("train", path=str(bad))
    truncated = tmp_path / "short.gz"
    _write_idx(str(truncated), np.zeros((4, 3), np.uint8))
    with gzip.open(truncated, "rb") as f:
        content = f.read()
    with gzip.open(truncated, "wb") as f:
        f.write(content[:-2])
    with pytest.raises(data.DataError, match="holds 10 data bytes but its header"):
        data.read_idx(str(truncated))


@pytest.mark.skipif(not os.path.exists(os.path.join(data.sources.FASHION_MNIST_DEFAULT_PATH,
                                                    "t10k-labels-idx1-ubyte.gz")),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_package():
    test = data.FashionMNIST("test")
    assert len(test) == 10_000
    assert np.bincount(test.labels).tolist() == [1000] * 10


def test_procedural_sources_are_deterministic():
    shapes = data.Shapes(size=100, resolution=16, seed=3)
    again = data.Shapes(size=100, resolution=16, seed=3)
    np.testing.assert_array_equal(shapes[42]["image"], again[42]["image"])
    assert shapes[42]["image"].shape == (16, 16, 3) and shapes[42]["image"].dtype == np.uint8
    assert not np.array_equal(shapes[42]["image"], data.Shapes(100, 16, seed=4)[42]["image"])
    labels = [int(shapes[i]["label"]) for i in range(100)]
    assert set(labels) == {0, 1, 2}
    for kind in data.Toy2D.KINDS:
        toy = data.Toy2D(kind, size=500, seed=1)
        points = np.stack([toy[i]["x"] for i in range(500)])
        assert points.shape == (500, 2) and np.all(np.abs(points) < 4)
        np.testing.assert_array_equal(points[10], data.Toy2D(kind, 500, seed=1)[10]["x"])
    with pytest.raises(data.DataError, match="unknown 2-D toy dataset 'moons'"):
        data.Toy2D("moons")


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_iterator_batches_are_model_inputs():
    batch = next(data.make_iterator(data.Shapes(64, 16), batch_size=8, seed=0))
    assert batch["x"].shape == (8, 16, 16, 3) and batch["x"].dtype == np.float32
    assert batch["x"].min() >= -1 and batch["x"].max() <= 1
    assert batch["label"].dtype == np.int32


def test_iterator_is_deterministic_and_resumes_at_the_same_example():
    source = data.Toy2D("mixture", size=200, seed=0)
    a = _take(data.make_iterator(source, batch_size=16, seed=7), 30)  # crosses epochs
    b = _take(data.make_iterator(source, batch_size=16, seed=7), 30)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["x"], y["x"])
    c = _take(data.make_iterator(source, batch_size=16, seed=8), 1)
    assert not np.array_equal(a[0]["x"], c[0]["x"])

    first = data.make_iterator(source, batch_size=16, seed=7)
    _take(first, 17)
    state = first.get_state()
    resumed = data.make_iterator(source, batch_size=16, seed=7)
    resumed.set_state(state)
    for expected, got in zip(a[17:], _take(resumed, 13)):
        np.testing.assert_array_equal(expected["x"], got["x"])
        np.testing.assert_array_equal(expected["label"], got["label"])


def test_each_process_reads_its_own_slice_of_the_global_batches():
    source = data.Toy2D("mixture", size=64, seed=0)
    single = list(data.make_iterator(source, batch_size=16, seed=3, num_epochs=1))
    shards = [list(data.make_iterator(source, batch_size=8, seed=3, shard_index=shard,
                                      shard_count=2, num_epochs=1))
              for shard in range(2)]
    assert len(single) == len(shards[0]) == len(shards[1]) == 4
    for step, whole in enumerate(single):
        # Process 0 holds the first half of each global batch and process 1 the second, in the
        # order a single process reads them: the global batch is the same.
        np.testing.assert_array_equal(
            np.concatenate([shards[0][step]["x"], shards[1][step]["x"]]), whole["x"])
    combined = np.concatenate([b["x"] for shard in shards for b in shard])
    assert len({tuple(p) for p in combined}) == 64  # disjoint shares covering everything


def test_worker_processes_give_deterministic_resumable_batches():
    """grain workers (data.worker_count) each batch their own records: the batches are the same
    for the same seed and worker count, hold every example once per epoch, and resume."""
    source = data.CaptionedShapes(size=96, resolution=16, seed=0)
    epoch = list(data.make_iterator(source, batch_size=8, seed=5, num_epochs=1, worker_count=2))
    assert len(epoch) == 12
    # Every record exactly once, as without workers (only the grouping into batches differs).
    single = list(data.make_iterator(source, batch_size=8, seed=5, num_epochs=1))
    rows = lambda batches: sorted(b["x"][i].tobytes() for b in batches for i in range(8))
    assert rows(epoch) == rows(single) and len(set(rows(epoch))) == 96

    first = data.make_iterator(source, batch_size=8, seed=5, worker_count=2)
    _take(first, 5)
    resumed = data.make_iterator(source, batch_size=8, seed=5, worker_count=2)
    resumed.set_state(first.get_state())
    # A second iterator of the same seed and worker count reads the same batches; resumed
    # from the first's position, it carries on where the first stopped.
    for expected, got in zip(epoch[5:], _take(resumed, 4)):
        np.testing.assert_array_equal(expected["x"], got["x"])
        np.testing.assert_array_equal(expected["tokens"], got["tokens"])
    with pytest.raises(ValueError):
        data.make_iterator(source, batch_size=8, seed=0, worker_count=-1)


def test_iterator_argument_errors():
    with pytest.raises(ValueError, match="too few"):
        data.make_iterator(data.Toy2D(size=10), batch_size=16, seed=0)
    with pytest.raises(ValueError, match="outside"):
        data.make_iterator(data.Toy2D(size=100), batch_size=4, seed=0, shard_index=2,
                           shard_count=2)


def test_tfds_without_tensorflow_datasets_or_data_is_explained(tmp_path):
    try:
        import tensorflow_datasets  # noqa: F401
        match = "is not prepared|could not be opened|was not found"  # (tests/test_tfds.py)
    except ImportError:
        match = "pip install tensorflow-datasets"
    with pytest.raises(data.DataError, match=match) as raised:
        data.TFDSSource("cifar10", data_dir=str(tmp_path))
    assert len(str(raised.value)) < 600  # not tfds's list of every dataset


def _grain_loader(source, batch_size, seed, num_epochs=None, shard_index=0, shard_count=1):
    """The pipeline as grain's own pieces build it (IndexSampler, threaded DataLoader): what
    make_iterator must match, batch for batch and in its saved positions."""
    sampler = grain.IndexSampler(num_records=len(source), shard_options=grain.NoSharding(),
                                 shuffle=True, num_epochs=num_epochs, seed=seed)
    if shard_count > 1:
        sampler = pipeline._ProcessSlice(sampler, batch_size, shard_index, shard_count)
    return iter(grain.DataLoader(
        data_source=source, sampler=sampler, shard_options=grain.NoSharding(),
        operations=[data.ToModelInputs(), grain.Batch(batch_size, drop_remainder=True)]))


def _assert_same_batches(expected, got):
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype
            np.testing.assert_array_equal(a[key], b[key])


def test_record_keys_sampler_is_grains_index_sampler_without_its_generators():
    for shuffle in (True, False):
        for epochs in (None, 2):
            ours = pipeline._make_sampler(37, shuffle=shuffle, seed=11, num_epochs=epochs)
            reference = grain.IndexSampler(num_records=37, shard_options=grain.NoSharding(),
                                           shuffle=shuffle, num_epochs=epochs, seed=11)
            assert isinstance(ours, pipeline._RecordKeys) and repr(ours) == repr(reference)
            assert [ours[i].record_key for i in range(74)] == [
                reference[i].record_key for i in range(74)]  # two epochs, reshuffled
            assert ours[5].index == 5 and ours[5].rng is None
            if epochs:
                with pytest.raises(IndexError):
                    ours[74]


def test_array_sources_are_read_a_batch_at_a_time_with_grains_batches_and_positions(
        fake_fashion_mnist):
    path, _, _ = fake_fashion_mnist
    source = data.FashionMNIST("train", path=str(path))  # 50 records: 6 batches of 8 an epoch
    fast = data.make_iterator(source, batch_size=8, seed=4)
    assert isinstance(fast, pipeline._BatchIterator)
    reference = _take(_grain_loader(source, 8, seed=4), 20)
    _assert_same_batches(reference, _take(fast, 20))  # across epochs, reshuffled each time
    # Finite epochs end where grain's loader ends (the partial batch dropped).
    _assert_same_batches(list(_grain_loader(source, 8, seed=4, num_epochs=2)),
                         list(data.make_iterator(source, batch_size=8, seed=4, num_epochs=2)))
    # Each process's slice of the global batches, as grain reads it.
    for shard in range(2):
        _assert_same_batches(
            _take(_grain_loader(source, 4, seed=4, shard_index=shard, shard_count=2), 9),
            _take(data.make_iterator(source, batch_size=4, seed=4, shard_index=shard,
                                     shard_count=2), 9))
    # Saved positions go both ways: grain's loader -> batch reader -> grain's loader.
    old = _grain_loader(source, 8, seed=4)
    _take(old, 7)
    assert fast.get_state() != old.get_state()
    resumed = data.make_iterator(source, batch_size=8, seed=4)
    resumed.set_state(old.get_state())
    assert resumed.get_state() == old.get_state()
    _assert_same_batches(reference[7:12], _take(resumed, 5))
    back = _grain_loader(source, 8, seed=4)
    back.set_state(resumed.get_state())
    _assert_same_batches(reference[12:15], _take(back, 3))
    with pytest.raises(ValueError, match="saved data position is for sampler"):
        data.make_iterator(source, batch_size=8, seed=5).set_state(old.get_state())


def test_procedural_sources_read_in_the_calling_thread_with_grains_batches():
    source = data.Shapes(40, 16, seed=2)
    iterator = data.make_iterator(source, batch_size=8, seed=1)
    assert not isinstance(iterator, pipeline._BatchIterator)
    _assert_same_batches(_take(_grain_loader(source, 8, seed=1), 7), _take(iterator, 7))
    assert data.TFDSSource.read_threads > 0 and not hasattr(source, "read_threads")


def test_batch_reader_position_is_checkpointed_like_grains(tmp_path, fake_fashion_mnist):
    """Through the training loop's pieces: the device prefetcher (which reports the position of
    the batches handed out), an Orbax checkpoint with grain's handler, and a restore into a fresh
    iterator, which carries on with the batches that followed."""
    import jax
    import jax.numpy as jnp

    from diffusion_jax import checkpoints, parallel

    path, _, _ = fake_fashion_mnist
    source = data.FashionMNIST("train", path=str(path))
    expected = _take(data.make_iterator(source, batch_size=8, seed=2), 12)
    mesh = parallel.make_mesh(-1, 1)
    prefetcher = parallel.DevicePrefetcher(data.make_iterator(source, batch_size=8, seed=2),
                                           mesh, size=3)
    for batch in expected[:7]:
        np.testing.assert_array_equal(next(prefetcher)["x"], batch["x"])
    manager = checkpoints.Checkpoints(str(tmp_path / "ckpt"), fingerprint={"data": 1})
    manager.save(7, {"w": jnp.ones(3)}, prefetcher)  # 3 batches wait on the devices, unused
    manager.wait()
    resumed = data.make_iterator(source, batch_size=8, seed=2)
    manager.restore({"w": jax.ShapeDtypeStruct((3,), jnp.float32)}, resumed)
    manager.close()
    _assert_same_batches(expected[7:12], _take(resumed, 5))
