"""Parity of the Flax LPIPS (VGG-16) with the reference ``lpips`` package, and its weight files.

Nothing is downloaded: the reference is built with a randomly initialised VGG-16 backbone
(``pnet_rand=True``) and the lin-layer weights that ship inside the ``lpips`` package.
"""

import copy
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

torch = pytest.importorskip("torch")
lpips_ref = pytest.importorskip(
    "lpips", reason="the reference LPIPS package is not installed (`pip install --no-deps lpips`)")

from diffusion_jax.models import lpips  # noqa: E402
from diffusion_jax.models.lpips import (  # noqa: E402
    LPIPS,
    convert_torch_state_dicts,
    load_weights,
    make_lpips_fn,
    save_npz,
)


# One compiled float32 program shared by the tests (the weights are arguments, not constants):
# compiling VGG-16 is most of this file's time.
_apply = jax.jit(LPIPS().apply)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """PyTorch's CPU thread pool competes with XLA's on two cores; one thread avoids that."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference():
    """(lpips.LPIPS with a random VGG-16 and the shipped lin layers, VGG state dict, lin dict)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation notes
        model = lpips_ref.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    state = model.state_dict()
    # lpips keeps torchvision's features.N under net.sliceK.N; undo that to get torchvision's names.
    vgg = {"features." + k.split(".", 2)[2]: v for k, v in state.items()
           if k.startswith("net.slice")}
    vgg["classifier.0.weight"] = torch.zeros(4, 8)  # torchvision's head, which LPIPS ignores
    lin = {f"lin{i}.model.1.weight": state[f"lin{i}.model.1.weight"] for i in range(5)}
    return model, vgg, lin


@pytest.fixture(scope="module")
def variables(reference):
    _, vgg, lin = reference
    return convert_torch_state_dicts(vgg, lin)


def _pairs(batch, height, width, channels=3, seed=0):
    """NCHW image pairs in [-1, 1]; the second is the first plus noise of growing strength."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (batch, channels, height, width)).astype(np.float32)
    noise = np.linspace(0.05, 0.6, batch, dtype=np.float32)[:, None, None, None]
    y = np.clip(x + noise * rng.standard_normal(x.shape, dtype=np.float32), -1, 1)
    return x, y


def _nhwc(a):
    return jnp.asarray(a.transpose(0, 2, 3, 1))


def _torch_distance(model, x, y):
    if x.shape[1] == 1:
        x, y = np.repeat(x, 3, axis=1), np.repeat(y, 3, axis=1)
    with torch.no_grad():
        return model(torch.from_numpy(x), torch.from_numpy(y)).numpy().reshape(-1)


def test_distances_match_lpips_package(reference, variables):
    model, _, _ = reference
    worst = 0.0
    for shape in [(3, 32, 32, 3), (2, 48, 32, 1)]:
        x, y = _pairs(*shape[:3], channels=shape[3])
        ref = _torch_distance(model, x, y)
        ours = np.asarray(_apply(variables, _nhwc(x), _nhwc(y)))
        assert ours.shape == (shape[0],) and ours.dtype == np.float32
        worst = max(worst, float(np.abs(ours - ref).max() / np.abs(ref).max()))
        assert np.all(np.diff(ref) > 0), ref  # more noise, larger distance: a non-trivial test
    # Both sides compute in float32 through 13 convolutions and round differently (measured worst
    # error 1.8e-7 of the largest distance); a real mistake (a wrong scaling constant, pool or
    # layer tap) changes the distances by percents.
    assert worst < 1e-5, f"worst relative error {worst:.2e}"


def test_float64_distances_match_exactly(reference, variables, x64):
    """In float64 the two graphs agree to round-off: a sharp check of every layer and constant."""
    model = copy.deepcopy(reference[0]).double()
    x, y = _pairs(2, 32, 32, seed=1)
    x, y = x.astype(np.float64), y.astype(np.float64)
    ref = _torch_distance(model, x, y)
    wide = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables)
    ours = np.asarray(jax.jit(LPIPS(dtype=jnp.float64).apply)(wide, _nhwc(x), _nhwc(y)))
    assert ours.dtype == np.float64
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < 1e-12, f"worst relative error {err:.2e}"  # measured 1.2e-16


def test_round_trip_through_files(reference, variables, tmp_path):
    _, vgg, lin = reference
    flat = {k: np.asarray(v) for k, v in flatten_dict(variables).items()}
    assert flat[("params", "conv1_1", "kernel")].shape == (3, 3, 3, 64)  # HWIO
    assert flat[("params", "lin4", "kernel")].shape == (1, 1, 512, 1)
    npz = tmp_path / "lpips.npz"
    save_npz(variables, npz)
    vgg_pth, lin_pth = tmp_path / lpips.VGG16_WEIGHTS_FILE, tmp_path / "vgg.pth"
    torch.save(vgg, str(vgg_pth))
    torch.save(lin, str(lin_pth))
    converted = tmp_path / "converted.npz"
    assert lpips.main(["convert", str(vgg_pth), str(lin_pth), str(converted)]) == 0
    for loaded in (load_weights(npz), load_weights(converted), load_weights(vgg_pth, lin_pth)):
        loaded = flatten_dict(loaded)
        assert loaded.keys() == flat.keys()
        for k, v in loaded.items():
            np.testing.assert_array_equal(np.asarray(v), flat[k])
    x, y = _pairs(3, 32, 32)
    np.testing.assert_array_equal(np.asarray(_apply(load_weights(npz), _nhwc(x), _nhwc(y))),
                                  np.asarray(_apply(variables, _nhwc(x), _nhwc(y))))


def test_gradient_is_finite_and_self_distance_is_zero(variables):
    x, y = (_nhwc(a) for a in _pairs(2, 32, 32))

    @jax.jit
    def value_and_grads(variables, x, y):
        # Built inside the jitted function, the weights are arguments rather than constants.
        fn = make_lpips_fn(variables)
        return jax.value_and_grad(lambda a, b: jnp.sum(fn(a, b)))(x, y), fn(x, x)

    (value, grad), self_distance = value_and_grads(variables, x, y)
    assert np.isfinite(float(value)) and float(value) > 0
    assert np.all(np.isfinite(np.asarray(grad))) and float(jnp.abs(grad).max()) > 0
    np.testing.assert_array_equal(np.asarray(self_distance), 0.0)
    (_, grad_at_self), _ = value_and_grads(variables, x, x)
    assert np.all(np.isfinite(np.asarray(grad_at_self)))


def test_bfloat16_computation_is_close(variables):
    x, y = (_nhwc(a) for a in _pairs(3, 32, 32))
    full = np.asarray(_apply(variables, x, y))
    half = np.asarray(jax.jit(LPIPS(dtype=jnp.bfloat16).apply)(variables, x, y))
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, full, rtol=0.1)


def test_missing_weights_files_are_explained(tmp_path):
    for path in (tmp_path / "lpips.npz", tmp_path / lpips.VGG16_WEIGHTS_FILE):
        with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth") as info:
            load_weights(path, tmp_path / "vgg.pth")
        assert str(path) in str(info.value) and "lpips" in str(info.value)
    assert lpips.main(["convert", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"),
                       str(tmp_path / "c.npz")]) == 1


def test_pth_without_lin_file_is_explained(reference, tmp_path):
    path = tmp_path / lpips.VGG16_WEIGHTS_FILE
    torch.save(reference[1], str(path))
    with pytest.raises(ValueError, match="lin_path"):
        load_weights(path)


def test_bad_npz_names_the_entry(variables, tmp_path):
    arrays = {"/".join(k): np.asarray(v) for k, v in flatten_dict(variables).items()}
    missing = dict(arrays)
    del missing["params/conv3_2/bias"]
    np.savez(tmp_path / "missing.npz", **missing)
    with pytest.raises(ValueError, match=r"missing keys \['params/conv3_2/bias'\]"):
        load_weights(tmp_path / "missing.npz")
    np.savez(tmp_path / "extra.npz", **arrays, **{"params/lin9/kernel": np.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected keys \['params/lin9/kernel'\]"):
        load_weights(tmp_path / "extra.npz")
    wrong = dict(arrays, **{"params/lin2/kernel": np.zeros((1, 1, 128, 1), np.float32)})
    np.savez(tmp_path / "wrong.npz", **wrong)
    with pytest.raises(ValueError, match=r"params/lin2/kernel: got \(1, 1, 128, 1\), expected "
                                         r"\(1, 1, 256, 1\)"):
        load_weights(tmp_path / "wrong.npz")


def test_bad_state_dicts_name_the_keys(reference):
    _, vgg, lin = reference
    missing = dict(vgg)
    del missing["features.21.bias"]
    with pytest.raises(ValueError, match=r"VGG-16.*missing keys \['features\.21\.bias'\]"):
        convert_torch_state_dicts(missing, lin)
    extra = dict(lin, **{"lin5.model.1.weight": torch.zeros(1, 512, 1, 1)})
    with pytest.raises(ValueError, match=r"lin-layer.*unexpected keys \['lin5\.model\.1\.weig"):
        convert_torch_state_dicts(vgg, extra)
    wrong = dict(vgg, **{"features.0.weight": torch.zeros(64, 3, 5, 5)})
    with pytest.raises(ValueError, match=r"features\.0\.weight: got \(5, 5, 3, 64\)"):
        convert_torch_state_dicts(wrong, lin)


def test_bad_images_are_refused(variables):
    fn = make_lpips_fn(variables)
    with pytest.raises(ValueError, match="at least 16 x 16"):
        fn(jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="same shape"):
        fn(jnp.zeros((1, 32, 32, 3)), jnp.zeros((2, 32, 32, 3)))
    with pytest.raises(ValueError, match="channels"):
        fn(jnp.zeros((1, 32, 32, 4)), jnp.zeros((1, 32, 32, 4)))
