"""Denoisers: parameter counts of the paper architectures, shapes, conditioning, dropout, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import parameterization, samplers
from diffusion_jax.models import DiT, UNet, dit


def _count(model, x_shape, labels=False):
    args = [jnp.zeros(x_shape), jnp.zeros(x_shape[:1])]
    if labels:
        args.append(jnp.zeros(x_shape[:1], jnp.int32))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(shapes))


def _randomised(params, key, scale=0.05):
    """Replace every parameter (zero-initialised ones included) with small random values so that
    every path through the network matters."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [scale * jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    )


def test_ddpm_cifar10_unet_has_the_papers_parameter_count():
    # Ho et al. 2020: 35.7M parameters (35,746,307 in the released CIFAR-10 model).
    model = UNet(channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                 attention_resolutions=(16,), dropout=0.1)
    assert _count(model, (1, 32, 32, 3)) == 35_746_307


def test_dit_xl2_has_the_papers_parameter_count():
    # Peebles & Xie 2023: DiT-XL/2 on 32x32x4 latents with learned variance (8 output channels)
    # and 1000 classes has 675,129,632 parameters counting the 256 x 1152 position embedding,
    # which is fixed (not a parameter) here.
    model = dit("XL", 2, num_classes=1000, out_channels=8)
    assert _count(model, (1, 32, 32, 4), labels=True) == 675_129_632 - 256 * 1152


TINY_UNET = dict(channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                 num_heads=2, dropout=0.1, num_groups=8)


@pytest.mark.parametrize("make", [
    lambda **kw: UNet(**TINY_UNET, **kw),
    lambda **kw: DiT(patch_size=2, hidden=64, depth=2, num_heads=4, **kw),
], ids=["unet", "dit"])
def test_shapes_conditioning_and_null_label(make):
    model = make(num_classes=10)
    x = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
    t = jnp.array([0.1, 0.5, 0.9])
    labels = jnp.array([1, 2, 3])
    params = jax.jit(model.init)(jax.random.key(1), x, t, labels)
    apply = jax.jit(model.apply)
    # Zero-initialised output layers: the untrained network predicts exactly zero.
    np.testing.assert_array_equal(apply(params, x, t, labels), 0.0)
    params = _randomised(params, jax.random.key(2))
    out = apply(params, x, t, labels)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert not np.allclose(out, apply(params, x, t, jnp.array([4, 5, 6])))
    assert not np.allclose(out, apply(params, x, t + 0.2, labels))
    null = jnp.full((3,), 10)
    np.testing.assert_allclose(apply(params, x, t), apply(params, x, t, null), rtol=1e-6,
                               atol=1e-6)


def test_unet_dropout_only_in_training():
    model = UNet(**TINY_UNET)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    t = jnp.array([0.3, 0.7])
    params = _randomised(jax.jit(model.init)(jax.random.key(1), x, t), jax.random.key(2))
    apply = jax.jit(model.apply, static_argnames="train")
    np.testing.assert_array_equal(apply(params, x, t), apply(params, x, t))
    train = lambda seed: apply(params, x, t, train=True,  # noqa: E731
                               rngs={"dropout": jax.random.key(seed)})
    assert not np.allclose(train(0), train(1))
    np.testing.assert_array_equal(train(0), train(0))


@pytest.mark.parametrize("make", [
    lambda **kw: UNet(**TINY_UNET, **kw),
    lambda **kw: DiT(patch_size=4, hidden=64, depth=2, num_heads=4, **kw),
], ids=["unet", "dit"])
def test_bfloat16_compute_keeps_float32_parameters(make):
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    t = jnp.array([0.3, 0.7])
    params = _randomised(jax.jit(make().init)(jax.random.key(1), x, t), jax.random.key(2),
                         scale=0.1)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    full = jax.jit(make().apply)(params, x, t)
    half = jax.jit(make(dtype=jnp.bfloat16).apply)(params, x, t)
    assert half.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(full - half)) / jnp.max(jnp.abs(full)))
    assert 0 < err < 0.05, err


def test_dit_unpatchify_layout():
    """With everything zero but the final bias, every p x p patch of the output is that bias laid
    out as [row, column, channel]."""
    model = DiT(patch_size=4, hidden=32, depth=1, num_heads=2)
    x = jnp.zeros((1, 8, 12, 2))
    params = model.init(jax.random.key(0), x, jnp.zeros(1))
    pattern = jnp.arange(4 * 4 * 2, dtype=jnp.float32)
    params = jax.tree_util.tree_map(jnp.zeros_like, params)
    params["params"]["final_linear"]["bias"] = pattern
    out = model.apply(params, x, jnp.zeros(1))
    tile = np.asarray(pattern).reshape(4, 4, 2)
    np.testing.assert_array_equal(out[0], np.tile(tile, (2, 3, 1)))


def test_model_errors_are_clear():
    model = UNet(**TINY_UNET)
    with pytest.raises(ValueError, match="divisible by 2"):
        model.init(jax.random.key(0), jnp.zeros((1, 15, 16, 3)), jnp.zeros(1))
    with pytest.raises(ValueError, match="no num_classes"):
        model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros(1), jnp.zeros(1, int))
    with pytest.raises(ValueError, match="unknown DiT size 'M'"):
        dit("M")
    with pytest.raises(ValueError, match="not divisible by patch size"):
        DiT(patch_size=4, hidden=32, depth=1, num_heads=2).init(
            jax.random.key(0), jnp.zeros((1, 10, 12, 2)), jnp.zeros(1))


def test_unet_drives_a_sampler_with_guidance():
    from diffusion_jax import guidance

    model = UNet(**TINY_UNET, num_classes=10)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    params = _randomised(model.init(jax.random.key(1), x, jnp.zeros(2), jnp.zeros(2, int)),
                         jax.random.key(2), scale=0.02)
    denoise = parameterization.make_denoise_fn(
        lambda x_in, noise, labels: model.apply(params, x_in, noise, labels), "cosine", "v")
    guided = guidance.classifier_free_guidance(
        denoise, cond=jnp.array([3, 7]), uncond=jnp.full((2,), 10), scale=3.0)
    result = samplers.sample(guided, x, schedule="cosine", method="dpmpp_2m", num_steps=3)
    assert result.samples.shape == x.shape and np.all(np.isfinite(result.samples))
