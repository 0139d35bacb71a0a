"""LoRA adapters of our own networks: selection, init, merge / unmerge, refusal, size, gradients.

The tiny UNet of configs/tiny.py (built by the model registry, with and without text
cross-attention), DiT-S from the registry (shapes only) and a small DiT, and a small CLIP text
encoder. Parameters are random values of the networks' shapes (no initialisation to compile).
Merging (two rank-8 adapters changing kernels by up to 3.3) then unmerging returns the base to
float32 round-off: worst error seen 1.2e-7 on merged kernels up to 3.5 (half a unit in the last
place of 2-4); the tolerance is 1e-6.
"""

from __future__ import annotations

import importlib
import math

import flax.core
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import lora
from diffusion_jax.models import registry
from diffusion_jax.models.clip_text import CLIPTextTransformer
from diffusion_jax.models.dit import DiT

X = jnp.zeros((1, 16, 16, 3))


def _shapes(model, *args, **kwargs):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))["params"]


def _random(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def _tiny_unet(context_dim=None):
    config = importlib.import_module("configs.tiny").get_config()
    common = dict(num_classes=None, noise_scale=1000.0, dtype=jnp.float32, dropout=0.0,
                  context_dim=context_dim, pooled_dim=None, remat=False, attention="xla")
    return registry.get("unet").build(config.model.unet, (16, 16, 3), common)


@pytest.fixture(scope="module")
def unet():
    model = _tiny_unet(context_dim=8)
    context = jnp.zeros((1, 5, 8))
    return model, _random(_shapes(model, X, jnp.ones(1), context=context))


@pytest.fixture(scope="module")
def dit():
    model = DiT(patch_size=4, hidden=32, depth=2, num_heads=2, context_dim=8)
    return model, _random(_shapes(model, X, jnp.ones(1), context=jnp.zeros((1, 3, 8))))


def _clip_shapes():
    module = CLIPTextTransformer(vocab_size=100, hidden_size=16, intermediate_size=32,
                                 num_layers=2, num_heads=2, max_positions=8, eos_token_id=99)
    return _shapes(module, jnp.zeros((1, 4), jnp.int32))


def _suffixes(paths):
    return sorted({"/".join(p.split("/")[-3:-1]) for p in paths})


def test_presets_select_the_attention_projections(unet):
    _, params = unet
    kernels = lora.kernel_paths(params)
    chosen = lora.select(params, "unet_attention")
    blocks = {p.split("/self_attention")[0] for p in kernels if "/self_attention/" in p}
    assert len(blocks) >= 3 and len(chosen) == 5 * len(blocks)
    assert _suffixes(chosen) == ["cross_attention/key_value", "cross_attention/out",
                                 "cross_attention/query", "self_attention/out",
                                 "self_attention/qkv"]
    assert lora.select(params, "attention") == chosen
    transformer = lora.select(params, "unet_transformer")
    assert set(chosen) < set(transformer)
    assert {"feed_forward/proj_in", "feed_forward/proj_out"} < set(_suffixes(transformer))
    assert any(p.endswith("_attn_0/proj_in/kernel") for p in transformer)
    linear, conv = lora.select(params, "all_linear"), lora.select(params, "all_conv")
    assert sorted(linear + conv) == lora.select(params, "all") == sorted(kernels)
    assert all(len(kernels[p]) == 4 for p in conv) and "conv_in/kernel" in conv
    # Regular expressions are searched in the path; a list is the union.
    assert lora.select(params, ["cross_attention/query", r"^conv_in/"]) == sorted(
        [p for p in chosen if "query" in p] + ["conv_in/kernel"])
    # The unconditional UNet's attention blocks.
    model = _tiny_unet()
    plain = _shapes(model, X, jnp.ones(1))
    assert _suffixes(lora.select(plain, "unet_attention")) == ["attention/out", "attention/qkv"]
    with pytest.raises(ValueError, match=r"select no kernel.*presets: \["):
        lora.select(plain, "dit_attention")
    with pytest.raises(ValueError, match="neither a preset"):
        lora.select(plain, "(unclosed")


def test_presets_of_the_dit_and_the_clip_text_encoder():
    group = registry.get("dit").default_group()
    common = dict(num_classes=10, noise_scale=1000.0, dtype=jnp.float32, dropout=0.0,
                  context_dim=None, pooled_dim=None, remat=False, attention="xla")
    model = registry.get("dit").build(group, (32, 32, 4), common)
    params = _shapes(model, jnp.zeros((1, 32, 32, 4)), jnp.ones(1))
    chosen = lora.select(params, "dit_attention")
    assert len(chosen) == 2 * model.depth and _suffixes(chosen) == ["attention/out",
                                                                   "attention/qkv"]
    assert lora.select(params, "attention") == chosen
    assert len(lora.select(params, "dit_blocks")) == 4 * model.depth
    clip = _clip_shapes()
    chosen = lora.select(clip, "clip_attention")
    assert len(chosen) == 8 and {p.split("/")[-2] for p in chosen} == {
        "q_proj", "k_proj", "v_proj", "out_proj"}
    assert lora.select(clip, "attention") == chosen
    assert len(lora.select(clip, "clip_transformer")) == 12


def test_init_draws_down_as_peft_and_up_zero(unet):
    _, params = unet
    adapter = lora.init(jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params),
                        ["all"], rank=4, alpha=None, key=jax.random.key(1))
    kernels = lora.kernel_paths(params)
    assert adapter.paths == sorted(kernels)
    assert set(adapter.ranks.values()) == {4} and set(adapter.scales.values()) == {1.0}
    for path, factors in adapter.weights.items():
        shape = kernels[path]
        bound = 1 / math.sqrt(math.prod(shape[:-1]))
        assert factors["down"].shape == shape[:-1] + (4,) and factors["up"].shape == (4, shape[-1])
        assert factors["down"].dtype == factors["up"].dtype == jnp.float32
        assert 0.5 * bound < float(jnp.abs(factors["down"]).max()) <= bound
        assert not np.any(np.asarray(factors["up"]))
    big = max(adapter.paths, key=lambda p: adapter.weights[p]["down"].size)
    std = float(jnp.std(adapter.weights[big]["down"]))
    bound = 1 / math.sqrt(math.prod(kernels[big][:-1]))
    assert abs(std - bound / math.sqrt(3)) < 0.1 * bound  # uniform on [-bound, bound]
    # Deterministic in the key; the same under jit (inside eval_shape / jit, as a train step).
    again = jax.jit(lambda p, k: lora.init(p, "all", 4, None, k))(params, jax.random.key(1))
    jax.tree_util.tree_map(np.testing.assert_array_equal, adapter, again)
    assert lora.init(params, "all", 2, 6, jax.random.key(0)).scales[big] == 3.0
    with pytest.raises(ValueError, match="positive integer"):
        lora.init(params, "all", 0, None, jax.random.key(0))


def test_a_fresh_adapter_changes_nothing_bit_for_bit(dit):
    model, params = dit
    adapter = lora.init(params, "all", rank=3, alpha=7, key=jax.random.key(0))
    for merged in (lora.apply(params, adapter, 0.8),
                   jax.jit(lora.apply)(params, adapter, 2.5)):
        leaves, base = jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(params)
        assert len(leaves) == len(base)
        for a, b in zip(leaves, base):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), b)
    frozen = flax.core.freeze(params)
    assert isinstance(lora.apply(frozen, adapter), flax.core.FrozenDict)
    inputs = (jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 3)), jnp.float32),
              jnp.array([0.3, 0.7]))
    run = jax.jit(lambda p: model.apply({"params": p}, *inputs, context=jnp.ones((2, 3, 8))))
    np.testing.assert_array_equal(run(lora.apply(params, adapter)), run(params))


def _randomized(adapter, seed=0, scale=0.1):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), adapter)


def test_apply_adds_the_scaled_low_rank_product(unet):
    _, params = unet
    one = _randomized(lora.init(params, ["unet_attention", "all_conv"], 4, 8,
                                jax.random.key(0)))
    two = _randomized(lora.init(params, "unet_transformer", 2, None, jax.random.key(1)), 1)
    merged = lora.apply(params, [one, two], [0.5, -1.5])
    flat_base = flax.traverse_util.flatten_dict(params, sep="/")
    flat = flax.traverse_util.flatten_dict(merged, sep="/")
    for path, base in flat_base.items():
        expected = np.asarray(base, np.float64)
        for adapter, scale in ((one, 0.5), (two, -1.5)):
            if path in adapter.weights:
                down, up = (np.asarray(adapter.weights[path][f], np.float64) for f in ("down",
                                                                                     "up"))
                expected = expected + scale * adapter.scales[path] * np.tensordot(down, up, 1)
        if path in one.weights or path in two.weights:
            np.testing.assert_allclose(flat[path], expected, rtol=1e-6, atol=1e-6)
            assert not np.array_equal(flat[path], base)
        else:
            assert flat[path] is base  # untouched leaves are passed through
    assert one.scales[one.paths[0]] == 2.0
    # Linear in the scale; a vector of scales (traced under jit) works as a list does.
    half = lora.apply(params, one, 0.5)
    double = jax.jit(lambda p, a, s: lora.apply(p, [a, a], s))(params, one, jnp.array([1., 1.]))
    for path in one.paths:
        key = tuple(path.split("/"))
        base = flax.traverse_util.flatten_dict(params)[key]
        got = flax.traverse_util.flatten_dict(double)[key] - base
        want = 4 * (flax.traverse_util.flatten_dict(half)[key] - base)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_merge_then_unmerge_returns_the_base(unet, dit):
    worst = 0.0
    for _, params in (unet, dit):
        adapters = [_randomized(lora.init(params, "all", 8, 16, jax.random.key(i)), i, 0.3)
                    for i in range(2)]
        merged = lora.merge(params, adapters, [1.0, 0.6])
        back = lora.unmerge(merged, adapters, [1.0, 0.6])
        changed = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(
            jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(params)))
        error = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(
            jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)))
        largest = max(float(np.abs(np.asarray(a)).max()) for a in
                      jax.tree_util.tree_leaves(merged))
        assert changed > 1.0
        worst = max(worst, error)
        print(f"merge then unmerge: worst abs error {error:.1e}, merged kernels up to "
              f"{largest:.1f}, changed by up to {changed:.1f}")
    assert worst < 1e-6


def test_an_adapter_for_another_model_is_refused(unet, dit):
    _, unet_params = unet
    _, dit_params = dit
    adapter = lora.init(dit_params, "dit_attention", 4, None, jax.random.key(0))
    with pytest.raises(ValueError, match=r"block_0/attention/qkv/kernel: no such kernel in the "
                                          r"base parameters \(down \(32, 4\), up \(4, 96\)\)"):
        lora.apply(unet_params, adapter)
    # The same paths with other widths: the UNet of 32 base channels against the one of 16.
    model = _tiny_unet(context_dim=8)
    wider = _shapes(model.clone(channels=32, num_groups=32), X, jnp.ones(1),
                    context=jnp.zeros((1, 5, 8)))
    adapter = lora.init(wider, "unet_attention", 4, None, jax.random.key(0))
    with pytest.raises(ValueError) as info:
        jax.jit(lora.apply)(unet_params, adapter)
    message = str(info.value)
    assert "was it made for another model?" in message
    assert ("down_1_attn_0/block_0/self_attention/qkv/kernel: adapter down (64, 4) and up "
            "(4, 192) do not fit the base kernel (32, 96)") in message
    with pytest.raises(ValueError, match="name different layers"):
        lora.Adapter(adapter.weights, {})
    with pytest.raises(TypeError, match="expected lora.Adapter"):
        lora.apply(unet_params, [adapter.weights])
    with pytest.raises(ValueError, match="2 scales for 1 adapters"):
        lora.apply(wider, adapter, [1.0, 2.0])


def test_size_counts_parameters_and_bytes(unet):
    _, params = unet
    kernels = lora.kernel_paths(params)
    adapter = lora.init(params, "unet_attention", 4, None, jax.random.key(0))
    expected = sum(4 * (math.prod(kernels[p][:-1]) + kernels[p][-1]) for p in adapter.paths)
    assert lora.size(adapter) == (len(adapter.paths), expected, 4 * expected)
    assert lora.size(adapter.astype(jnp.bfloat16)).bytes == 2 * expected
    assert f"{expected:,} parameters" in repr(adapter)


def test_gradients_train_the_adapter_only(dit):
    model, params = dit
    adapter = lora.init(params, "dit_blocks", 4, 8, jax.random.key(0))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 16, 16, 3)), jnp.float32)
    t, context = jnp.linspace(0.1, 0.9, 4), jnp.asarray(rng.standard_normal((4, 3, 8)),
                                                          jnp.float32)

    def loss_fn(adapter, params):
        out = model.apply({"params": lora.apply(params, adapter)}, x, t, context=context)
        return jnp.mean((out - x) ** 2)

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    loss, grads = grad_fn(adapter, params)
    assert isinstance(grads, lora.Adapter) and grads.alphas == adapter.alphas
    # With up = 0 the product's gradient reaches up only (as in Hu et al.'s initialisation).
    assert all(not np.any(np.asarray(g["down"])) for g in grads.weights.values())
    assert any(np.any(np.asarray(g["up"])) for g in grads.weights.values())
    losses = [float(loss)]
    for _ in range(3):
        norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree_util.tree_leaves(grads))))
        adapter = jax.tree_util.tree_map(lambda a, g: a - 0.01 * g / norm, adapter, grads)
        loss, grads = grad_fn(adapter, params)
        losses.append(float(loss))
    assert losses[0] > losses[1] > losses[2] > losses[3], losses
    keys = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(adapter)]
    assert keys[0].startswith(".weights['block_0/") and len(keys) == 2 * len(adapter.paths)
