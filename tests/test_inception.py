"""Parity of the Flax FID Inception with pytorch-fid's PyTorch model, and its weight files.

No weights are downloaded: pytorch-fid's loader is replaced by one that returns a random state
dict, with batch-norm statistics calibrated on the test images so that every layer sees
non-trivial, input-dependent activations.
"""

import copy
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_fid")
try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's note that its image codecs did not load
        from pytorch_fid import inception as fid_inception
except RuntimeError as e:  # pragma: no cover - depends on the installed torchvision
    # torchvision >= 0.17 registers kernels for its compiled ops at import and fails when its
    # (CUDA-linked) extension cannot load next to a CPU-only torch; 0.16.2 tolerates that.
    raise RuntimeError("torchvision does not import next to this torch; for these tests install "
                       "`pip install --no-deps torchvision==0.16.2 pytorch-fid==0.3.0`") from e

from diffusion_jax.models import inception  # noqa: E402
from diffusion_jax.models.inception import (  # noqa: E402
    InceptionV3FID,
    convert_torch_state_dict,
    load_weights,
    make_feature_fn,
    resize_bilinear,
    save_npz,
)

# Test images in [0, 1], NCHW for torch, as (batch, height, width): upsampled (32, 64) and
# downsampled (400 x 330) to 299.
_SHAPES = [(2, 32, 32), (2, 64, 64), (2, 400, 330)]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """PyTorch's CPU thread pool, spinning next to XLA's on two busy cores, made each forward
    pass over 10x slower here (5 s instead of 0.35 s); one thread avoids that."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images():
    rng = np.random.default_rng(0)
    return [rng.random((n, 3, h, w), dtype=np.float32) for n, h, w in _SHAPES]


def _to_ours(x):
    """NCHW in [0, 1] (pytorch-fid's input) -> NHWC in [-1, 1] (ours)."""
    return jnp.asarray(x.transpose(0, 2, 3, 1) * 2.0 - 1.0)


def _random_fid_state_dict(calibration):
    """A pytorch-fid FID Inception state dict with He-initialised convolutions, random batch-norm
    scales and offsets, and running statistics measured on ``calibration`` (NCHW, 299 x 299)."""
    net = fid_inception.fid_inception_v3()  # the loader is patched: its own fresh weights
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, generator=gen)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.2, generator=gen)
                m.reset_running_stats()
                m.momentum = None  # running stats = plain average of the batches seen
        net.train()
        net(calibration)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def torch_fid():
    """(pytorch-fid InceptionV3 returning 2048-d pool features, its Inception state dict)."""
    torch.manual_seed(0)
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(fid_inception, "load_state_dict_from_url", lambda *a, **k: fid_inception
                   ._inception_v3(num_classes=1008, aux_logits=False, weights=None).state_dict())
        calibration = torch.cat([
            torch.nn.functional.interpolate(torch.from_numpy(x), size=(299, 299),
                                            mode="bilinear", align_corners=False) * 2 - 1
            for x in _images()])
        state = _random_fid_state_dict(calibration)
        mp.setattr(fid_inception, "load_state_dict_from_url", lambda *a, **k: state)
        model = fid_inception.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    finally:
        mp.undo()
    return model, state


def test_resize_matches_torch_interpolate():
    rng = np.random.default_rng(1)
    for h, w in [(32, 32), (64, 48), (299, 299), (512, 400), (2, 3)]:
        x = rng.random((1, 3, h, w), dtype=np.float32)
        ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(299, 299),
                                              mode="bilinear", align_corners=False).numpy()
        ours = np.asarray(resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), 299))
        np.testing.assert_allclose(ours.transpose(0, 3, 1, 2), ref, rtol=0, atol=1e-6)


def test_features_match_pytorch_fid(torch_fid):
    model, state = torch_fid
    features = make_feature_fn(convert_torch_state_dict(state))
    refs = []
    for x in _images():
        with torch.no_grad():
            ref = model(torch.from_numpy(x))[0][:, :, 0, 0].numpy()
        refs.append(ref)
        ours = np.asarray(features(_to_ours(x)))
        assert ours.shape == (len(x), 2048) and ours.dtype == np.float32
        # Both sides compute in float32 but round differently through ~50 layers, and this random
        # network amplifies rounding noise about 100x. Measured max |ours - torch| / max |torch|
        # is 6e-5 to 1.0e-4 for the three sizes (abs up to 1.4e-4 at features up to 1.5); 5e-4
        # leaves ~5x headroom. A real mistake (e.g. padding counted in the average pools) gives
        # ~0.6; the float64 test below checks the graph far more sharply.
        err = np.abs(ours - ref).max() / np.abs(ref).max()
        assert err < 5e-4, (x.shape, err)
    refs = np.concatenate(refs)  # the features depend on the image, not just on the biases:
    assert refs.std(axis=0).mean() > 0.05 * np.abs(refs).mean()


def test_float64_features_match_pytorch_fid_exactly(torch_fid, x64):
    """In float64 the rounding noise is gone and the two graphs must agree to ~1e-12: a sharp
    check of every padding, pooling, concatenation order and weight layout."""
    model, state = torch_fid
    model = copy.deepcopy(model).double()
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64),
                                       convert_torch_state_dict(state))
    apply = jax.jit(InceptionV3FID(dtype=jnp.float64).apply)
    x = _images()[0][:1].astype(np.float64)
    with torch.no_grad():
        ref = model(torch.from_numpy(x))[0][:, :, 0, 0].numpy()
    ours = np.asarray(apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1) * 2.0 - 1.0)))
    assert ours.dtype == np.float64
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < 1e-9, err  # measured ~2e-13


def test_npz_and_pth_round_trip(torch_fid, tmp_path):
    _, state = torch_fid
    variables = convert_torch_state_dict(state)
    flat = {k: np.asarray(v) for k, v in flatten_dict(variables).items()}
    assert set(variables) == {"params", "batch_stats"}
    assert flat[("params", "Conv2d_1a_3x3", "conv", "kernel")].shape == (3, 3, 3, 32)  # HWIO

    npz = tmp_path / "fid.npz"
    save_npz(variables, str(npz))
    pth = tmp_path / "fid.pth"
    torch.save(state, str(pth))
    npz2 = tmp_path / "converted.npz"
    assert inception.main(["convert", str(pth), str(npz2)]) == 0
    for path in (npz, pth, npz2):
        loaded = flatten_dict(load_weights(path))
        assert loaded.keys() == flat.keys()
        for k, v in loaded.items():
            np.testing.assert_array_equal(np.asarray(v), flat[k])


def test_missing_weights_file_is_explained(tmp_path):
    path = tmp_path / inception.FID_WEIGHTS_FILE
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05") as info:
        load_weights(path)
    assert str(path) in str(info.value) and "pytorch-fid" in str(info.value)


def test_bad_state_dict_names_the_keys(torch_fid):
    _, state = torch_fid
    missing = dict(state)
    del missing["Mixed_6c.branch7x7_2.bn.running_var"]
    with pytest.raises(ValueError, match=r"Mixed_6c\.branch7x7_2\.bn\.running_var"):
        convert_torch_state_dict(missing)
    extra = dict(state, **{"Mixed_9z.conv.weight": np.zeros(1)})
    with pytest.raises(ValueError, match=r"Mixed_9z\.conv\.weight"):
        convert_torch_state_dict(extra)
    wrong = dict(state, **{"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 5, 5))})
    with pytest.raises(ValueError, match=r"Conv2d_1a_3x3\.conv\.weight"):
        convert_torch_state_dict(wrong)
