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


# --------------------------------------------------------------------------------------------
# Text conditioning (cross-attention to token embeddings, pooled embedding), remat, SD 1.5 shape.
# --------------------------------------------------------------------------------------------

CONTEXT_DIM, POOLED_DIM = 12, 6
# One resolution level keeps compilation short; attention at 8x8 (down, middle and up) is enough
# to exercise every cross-attention block type.
TEXT_UNET = dict(channels=16, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(8,),
                 num_heads=2, dropout=0.1, num_groups=4, context_dim=CONTEXT_DIM,
                 pooled_dim=POOLED_DIM)
TEXT_DIT = dict(patch_size=2, hidden=32, depth=2, num_heads=2, context_dim=CONTEXT_DIM,
                pooled_dim=POOLED_DIM)
MAKE_TEXT_MODEL = pytest.mark.parametrize("make", [
    lambda **kw: UNet(**TEXT_UNET, **kw),
    lambda **kw: DiT(**TEXT_DIT, **kw),
], ids=["unet", "dit"])


def _text_inputs(batch=3):
    x = jax.random.normal(jax.random.key(0), (batch, 8, 8, 3))
    t = jnp.linspace(0.2, 0.8, batch)
    context = jax.random.normal(jax.random.key(1), (batch, 5, CONTEXT_DIM))
    # Example 0 has no real token at all (no text), 1 has three, 2 has five.
    mask = jnp.array([[0, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]] * (batch // 3), bool)
    pooled = jax.random.normal(jax.random.key(2), (batch, POOLED_DIM))
    return x, t, context, mask, pooled


def _text_params(model, key, scale=0.05):
    """Random parameters of the model's shapes (no init compilation needed)."""
    x, t, context, mask, pooled = _text_inputs()
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, context=context,
                                               context_mask=mask, pooled=pooled))
    return _randomised(shapes, key, scale)


def test_cross_attention_layer_masks_keys_and_handles_rows_without_tokens():
    from diffusion_jax.models.layers import MultiHeadCrossAttention

    layer = MultiHeadCrossAttention(num_heads=2)
    tokens = jax.random.normal(jax.random.key(0), (3, 4, 8))
    _, _, context, mask, _ = _text_inputs()
    params = layer.init(jax.random.key(1), tokens, context, mask)
    apply = jax.jit(lambda c: layer.apply(params, tokens, c, mask))
    out = apply(context)
    # An example without tokens gets exactly zero (bias included); the others do not.
    np.testing.assert_array_equal(out[0], 0.0)
    assert np.all(np.abs(out[1:]) > 0)
    # Masked keys are not attended: the first three tokens alone give example 1's output.
    alone = layer.apply(params, tokens[1:2], context[1:2, :3])
    np.testing.assert_allclose(out[1:2], alone, rtol=1e-5, atol=1e-6)
    # Gradients are finite (no NaN from the all-masked row) and zero for every masked token.
    grad = jax.jit(jax.grad(lambda c: jnp.sum(apply(c) ** 2)))(context)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(jnp.where(mask[..., None], 0.0, grad), 0.0)
    assert np.all(np.any(grad[1:, :3] != 0, axis=-1))
    # The key mask broadcasts over heads and queries ([B, 1, 1, L] of [B, heads, Lq, Lk]).
    with pytest.raises(ValueError, match="context mask"):
        layer.apply(params, tokens, context, mask[:, :4])


@MAKE_TEXT_MODEL
def test_text_conditioning_masks_padding_and_uses_pooled(make):
    model = make()
    params = _text_params(model, jax.random.key(4))
    x, t, context, mask, pooled = _text_inputs(batch=9)
    # Variants of the three examples, batched into one call (examples are independent):
    # rows 3-5 replace every masked token embedding, rows 6-8 change a real token of example 1
    # (in row 7) and the pooled embedding of example 2 (in row 8), and row 6 has zero pooled.
    padding = jax.random.normal(jax.random.key(5), context.shape)
    context = context.at[3:6].set(jnp.where(mask[:3, :, None], context[:3], padding[3:6]))
    context = context.at[7, 0].add(1.0)
    pooled = pooled.at[6].set(0.0).at[8].add(1.0)
    for i in range(3):
        x, t = x.at[3 * i:3 * i + 3].set(x[:3]), t.at[3 * i:3 * i + 3].set(t[:3])
    pooled = pooled.at[3:6].set(pooled[:3]).at[7].set(pooled[1])
    context = context.at[6].set(context[0]).at[8].set(context[2])
    out = jax.jit(lambda x, t, c, m, p: model.apply(params, x, t, context=c, context_mask=m,
                                                    pooled=p))(x, t, context, mask, pooled)
    assert out.shape == x.shape and np.all(np.isfinite(out))
    # Padded (masked) token embeddings do not matter, including a row that is all padding.
    np.testing.assert_allclose(out[3:6], out[:3], rtol=1e-6, atol=1e-6)
    # Real tokens and the pooled embedding do.
    assert not np.allclose(out[7], out[1], rtol=1e-4, atol=1e-5)
    assert not np.allclose(out[8], out[2], rtol=1e-4, atol=1e-5)
    # An all-False mask means "no text": the same as context=None; pooled=None means zeros.
    no_text = jax.jit(model.apply)(params, x[6:7], t[6:7])
    np.testing.assert_allclose(no_text, out[6:7], rtol=1e-5, atol=1e-6)


@MAKE_TEXT_MODEL
def test_remat_gives_the_same_results_and_saves_less_for_the_backward_pass(make):
    x, t, context, mask, pooled = _text_inputs()
    plain, remat = make(), make(remat=True)
    init = lambda model: jax.eval_shape(lambda: model.init(  # noqa: E731
        jax.random.key(3), x, t, context=context, context_mask=mask, pooled=pooled))
    # The same tree (names, shapes, dtypes): checkpoints are interchangeable.
    assert init(plain) == init(remat)
    params = _text_params(plain, jax.random.key(4), scale=0.1)

    def loss(model):
        def fn(p):  # train=True: dropout (in the UNet) must also be recomputed identically
            out = model.apply(p, x, t, None, True, context, mask, pooled,
                              rngs={"dropout": jax.random.key(6)})
            return jnp.mean((out - x) ** 2)
        return jax.jit(jax.value_and_grad(fn))

    value, grads = loss(plain)(params)
    remat_value, remat_grads = loss(remat)(params)
    np.testing.assert_allclose(remat_value, value, rtol=1e-6)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(remat_grads)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)

    # What remat is for: the backward pass keeps only each block's inputs from the forward pass.
    # The residuals of jax.vjp are what it keeps (the parameters among them, in both cases);
    # their shapes suffice.
    def kept_bytes(model):
        backward = jax.eval_shape(lambda p: jax.vjp(lambda p: model.apply(
            p, x, t, None, True, context, mask, pooled, rngs={"dropout": jax.random.key(6)}),
            p)[1], params)
        return sum(leaf.size * leaf.dtype.itemsize
                   for leaf in jax.tree_util.tree_leaves(backward))

    param_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(params))
    kept, remat_kept = kept_bytes(plain) - param_bytes, kept_bytes(remat) - param_bytes
    # Measured: UNet 4.15 MB -> 0.19 MB, DiT 0.60 MB -> 0.011 MB besides the parameters.
    assert 0 < remat_kept < 0.1 * kept, (kept, remat_kept)


def test_models_without_context_dim_have_no_text_parameters():
    x, t = jnp.zeros((1, 8, 8, 3)), jnp.zeros(1)
    for model in (UNet(**TINY_UNET), DiT(patch_size=2, hidden=32, depth=1, num_heads=2)):
        shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x, t))
        names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(shapes)]
        assert not any("cross" in n or "pooled" in n or "proj_in" in n for n in names), names
        with pytest.raises(ValueError, match="no context_dim"):
            model.init(jax.random.key(0), x, t, context=jnp.zeros((1, 3, 4)))
        with pytest.raises(ValueError, match="no pooled_dim"):
            model.init(jax.random.key(0), x, t, pooled=jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match="context_dim=12"):
        UNet(**TEXT_UNET).init(jax.random.key(0), x, t, context=jnp.zeros((1, 3, 4)))


def test_sd15_unet_has_the_parameter_count_of_stable_diffusion_1_5():
    from diffusion_jax.models import SD15_UNET_PARAMETERS, sd15_unet

    model = sd15_unet()
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, 64, 64, 4)), jnp.zeros(1),
        context=jnp.zeros((1, 77, 768))))
    count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(shapes))
    # diffusers' UNet2DConditionModel of runwayml/stable-diffusion-v1-5: 859,520,964.
    assert count == SD15_UNET_PARAMETERS == 859_520_964
    params = shapes["params"]
    # Attention (cross-attending transformers) at 64, 32 and 16 and in the middle, not at 8.
    attention = sorted(name for name in params if "attn" in name)
    assert attention == sorted([f"down_{lv}_attn_{b}" for lv in range(3) for b in range(2)]
                               + [f"up_{lv}_attn_{b}" for lv in range(3) for b in range(3)]
                               + ["mid_attn"])
    assert params["mid_attn"]["block_0"]["cross_attention"]["key_value"]["kernel"].shape == (
        768, 2 * 1280)


def test_build_model_passes_the_text_and_remat_options():
    from configs import default
    from diffusion_jax import configuration

    config = default.get_config()
    model = configuration.build_model(config.model, (16, 16, 3), 10)
    assert model.context_dim is None and model.pooled_dim is None and not model.remat
    assert model.mid_attention and model.head_dim is None and model.transformer_depth == 1
    config.model.update(context_dim=768, pooled_dim=512, remat=True)
    config.model.unet.update(transformer_depth=2, head_dim=32)
    model = configuration.build_model(config.model, (16, 16, 3), None)
    assert (model.context_dim, model.pooled_dim, model.remat, model.transformer_depth,
            model.head_dim) == (768, 512, True, 2, 32)
    config.model.name = "dit"
    model = configuration.build_model(config.model, (16, 16, 3), None)
    assert (model.context_dim, model.pooled_dim, model.remat) == (768, 512, True)
    config.model.name = "mlp"
    with pytest.raises(configuration.ConfigError, match="context_dim"):
        configuration.build_model(config.model, (2,), None)


@pytest.mark.parametrize("backward_runs", [True, False])
def test_auto_attention_checks_that_cudnn_can_also_differentiate(monkeypatch, backward_runs):
    """cuDNN's backward pass takes fewer shapes than its forward pass, and JAX checks them only
    when the attention is differentiated. "auto" must still fall back to XLA for such shapes
    (and "cudnn" say why) when the attention is called, not fail later in the training step.
    A stand-in for cuDNN (this machine has none) whose backward pass can or cannot run."""
    from diffusion_jax.models import layers

    real, calls = jax.nn.dot_product_attention, []

    @jax.custom_vjp
    def fake_cudnn(q, k, v):
        calls.append(q.shape)
        return real(q, k, v, implementation="xla")

    def forward(q, k, v):  # what differentiating it runs instead of fake_cudnn
        calls.append(q.shape)
        if not backward_runs:
            raise NotImplementedError("Unsupported sequence length Q 16, KV 5.")
        return jax.vjp(lambda *a: real(*a, implementation="xla"), q, k, v)

    fake_cudnn.defvjp(forward, lambda backward, g: backward(g))

    def stand_in(q, k, v, mask=None, implementation=None):
        if implementation == "cudnn":
            return fake_cudnn(q, k, v)
        return real(q, k, v, mask=mask, implementation=implementation)

    monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
    q = jax.random.normal(jax.random.key(0), (2, 16, 2, 8), jnp.bfloat16)
    k = jax.random.normal(jax.random.key(1), (2, 5, 2, 8), jnp.bfloat16)

    def loss(q, implementation):
        out = layers.dot_product_attention(q, k, k, None, implementation)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    with layers.compiling_for("gpu"):
        # Under remat (jax.checkpoint) the forward pass is traced before it is differentiated.
        value, grad = jax.value_and_grad(jax.checkpoint(loss, static_argnums=1))(q, "auto")
        # The check traces the stand-in's differentiation; then the loss uses it where it can
        # train (traced again), and XLA's attention where it cannot.
        assert len(calls) > 1 if backward_runs else len(calls) == 1, calls
        if not backward_runs:
            with pytest.raises(ValueError, match="cuDNN attention cannot run.*KV 5"):
                loss(q, "cudnn")
    expected_value, expected_grad = jax.value_and_grad(loss)(q, "xla")
    np.testing.assert_allclose(value, expected_value, rtol=1e-6)
    np.testing.assert_array_equal(grad, expected_grad)


def test_attention_kernel_choice():
    """model.attention: "auto" falls back to XLA where cuDNN does not apply (here: a CPU), with
    the same parameters and outputs; "cudnn" where it cannot run is an error saying why."""
    from diffusion_jax.models import dot_product_attention

    q = jax.random.normal(jax.random.key(0), (2, 16, 2, 8))
    k = jax.random.normal(jax.random.key(1), (2, 5, 2, 8))
    mask = jnp.arange(5)[None, None, None, :] < jnp.array([3, 5])[:, None, None, None]
    expected = jax.nn.dot_product_attention(q, k, k, mask=mask, implementation="xla")
    np.testing.assert_array_equal(dot_product_attention(q, k, k, mask, "auto"), expected)
    with pytest.raises(ValueError, match="cuDNN attention needs a GPU"):
        dot_product_attention(q, k, k, mask, "cudnn")
    with pytest.raises(ValueError, match="must be one of"):
        dot_product_attention(q, k, k, mask, "flash")
    # Compiling for a GPU from this machine (benchmarks/compiled_kernels.py): the kernels are
    # chosen for the GPU, so cuDNN is tried; it traces where JAX's CUDA plugin is installed,
    # and otherwise says that it cannot run here (rather than that this is no GPU).
    from diffusion_jax.models.layers import compiling_for

    half = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    with compiling_for("gpu"):
        try:
            program = str(jax.make_jaxpr(
                lambda q, k: dot_product_attention(q, k, k, mask, "cudnn"))(*half))
            assert "cudnn" in program
        except ValueError as err:
            assert "cuDNN attention cannot run" in str(err)
    with pytest.raises(ValueError, match="cuDNN attention needs a GPU"):
        dot_product_attention(*half, half[1], mask, "cudnn")

    x, t, context, mask, pooled = _text_inputs()
    for make in (lambda **kw: UNet(**TEXT_UNET, **kw), lambda **kw: DiT(**TEXT_DIT, **kw)):
        init = lambda model: jax.eval_shape(lambda: model.init(  # noqa: E731
            jax.random.key(3), x, t, context=context, context_mask=mask))
        xla, auto = make(), make(attention="auto")
        assert init(auto) == init(xla)
        # Here "auto" is XLA: the very same computation, traced (not compiled) to compare.
        params = init(xla)  # shapes suffice to trace
        program = lambda model: str(jax.make_jaxpr(lambda p: model.apply(  # noqa: E731
            p, x, t, context=context, context_mask=mask, pooled=pooled))(params))
        assert program(auto) == program(xla)
        # The choice reaches every attention layer: asking for cuDNN on a CPU fails.
        with pytest.raises(ValueError, match="cuDNN attention needs a GPU"):
            init(make(attention="cudnn"))

    # The text encoder's self-attention takes the same choice, from config.model.attention.
    from configs import text_shapes_cpu
    from diffusion_jax import configuration
    from diffusion_jax import models, text as text_lib

    tokens, token_mask = (jnp.asarray(a) for a in text_lib.encode(["a red square", ""], 16))
    encoder = lambda **kw: models.TextEncoder(  # noqa: E731
        max_length=16, width=32, depth=1, num_heads=2, **kw)

    def init(model):
        return jax.eval_shape(lambda: model.init(jax.random.key(4), tokens, token_mask))

    params = init(encoder())
    assert init(encoder(attention="auto")) == params

    def program(model):
        return str(jax.make_jaxpr(lambda p: model.apply(p, tokens, token_mask))(params))

    assert program(encoder(attention="auto")) == program(encoder())
    with pytest.raises(ValueError, match="cuDNN attention needs a GPU"):
        init(encoder(attention="cudnn"))
    config = text_shapes_cpu.get_config()
    config.model.attention = "cudnn"
    network = configuration.build_denoiser(config, (32, 32, 3))
    assert network.encoder.attention == network.denoiser.attention == "cudnn"


def test_upsample_nearest_repeats_pixels_and_its_gradient_sums_blocks():
    from diffusion_jax.models.layers import upsample_nearest
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 4))
    for factor in (2, 3):
        up = upsample_nearest(x, factor)
        expected = jax.image.resize(x, (2, 3 * factor, 5 * factor, 4), "nearest")
        np.testing.assert_array_equal(up, expected)
    weights = jax.random.normal(jax.random.key(1), (2, 6, 10, 4))
    grad_fn = jax.grad(lambda v: jnp.sum(upsample_nearest(v) * weights))
    block_sums = weights.reshape(2, 3, 2, 5, 2, 4).sum(axis=(2, 4))
    np.testing.assert_allclose(grad_fn(x), block_sums, rtol=1e-6, atol=1e-6)
    # A broadcast, not an index gather: the backward pass has no scatter-add (atomics on a GPU).
    assert "scatter" not in jax.jit(grad_fn).lower(x).as_text()


@pytest.mark.parametrize("dtype", [
    pytest.param(jnp.bfloat16, marks=pytest.mark.slow),  # bfloat16 compiles slowly on a CPU
    jnp.float32])
def test_sampler_casts_parameters_once_with_the_same_results(dtype):
    """Samplers hand the network the leaves it only ever casts already cast (once, before the
    loop): kernels, dense/conv biases and embeddings of a bf16 network, never its float32 norm
    parameters; a float32 network is left alone. The outputs are bit for bit the same."""
    from diffusion_jax import conditioning, generate

    model = UNet(**TINY_UNET, num_classes=3, dtype=dtype)
    net = conditioning.sampling_network(model)
    params = _randomised(model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros(1),
                                    jnp.zeros(1, jnp.int32))["params"], jax.random.key(1))
    cond = {"label": jnp.arange(4) % 4}  # 3 is the null label
    cast = generate.cast_params_once(net, params, (1, 16, 16, 3), cond)
    for path, leaf in jax.tree_util.tree_leaves_with_path(cast):
        name = jax.tree_util.keystr(path)
        if "norm" in name or dtype == jnp.float32:
            assert leaf.dtype == jnp.float32, name
        elif name.endswith(("['kernel']", "['bias']", "['embedding']")):
            assert leaf.dtype == jnp.bfloat16, name
    x = jax.random.normal(jax.random.key(2), (4, 16, 16, 3))
    t = jnp.linspace(0.1, 0.9, 4)
    np.testing.assert_array_equal(jax.jit(net)(cast, x, t, cond), jax.jit(net)(params, x, t, cond))


@pytest.mark.parametrize("dtype,input_dtype,shape,groups", [
    (jnp.float32, jnp.float32, (3, 8, 6, 64), 32),
    (None, jnp.float32, (2, 5, 3, 16), 4),        # Flax's default dtype: promoted with float32
    (jnp.bfloat16, jnp.float32, (2, 4, 4, 32), 8),
    (None, jnp.bfloat16, (2, 4, 4, 32), 8)])
def test_group_norm_is_flax_group_norm_with_a_written_gradient(dtype, input_dtype, shape, groups):
    import flax.linen as nn

    from diffusion_jax.models.layers import GroupNorm

    x = (3 * jax.random.normal(jax.random.key(0), shape) + 1.5).astype(input_dtype)
    reference, ours = nn.GroupNorm(groups, dtype=dtype), GroupNorm(groups, dtype=dtype)
    params = reference.init(jax.random.key(1), x)
    assert jax.tree_util.tree_map(jnp.shape, ours.init(jax.random.key(1), x)) == \
        jax.tree_util.tree_map(jnp.shape, params)
    params = jax.tree_util.tree_map(  # scale and bias away from 1 and 0
        lambda p: p + 0.3 * jax.random.normal(jax.random.key(2), p.shape), params)
    weights = jax.random.normal(jax.random.key(3), shape)

    def loss(apply):
        return lambda p, x: jnp.sum(jnp.sin(apply(p, x).astype(jnp.float32)) * weights)

    expected = reference.apply(params, x)
    expected_grads = jax.grad(loss(reference.apply), argnums=(0, 1))(params, x)
    for written in (False, True):
        apply = lambda p, x: ours.apply(p, x, written)  # noqa: E731
        out = apply(params, x)
        assert out.dtype == expected.dtype
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32),
                                   rtol=0, atol=2e-6 * float(jnp.max(jnp.abs(expected))))
        grads = jax.grad(loss(apply), argnums=(0, 1))(params, x)
        for got, want in zip(jax.tree_util.tree_leaves(grads),
                             jax.tree_util.tree_leaves(expected_grads)):
            assert got.dtype == want.dtype
            # float32 round-off; a bfloat16 input's gradient is rounded to bfloat16 (2^-8).
            tolerance = 2e-6 if want.dtype == jnp.float32 else 2 ** -7
            np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                       rtol=0, atol=tolerance * float(jnp.max(jnp.abs(want))))


def test_group_norm_written_gradient_in_bfloat16_is_as_accurate_and_forward_mode_works():
    import flax.linen as nn

    from diffusion_jax.models.layers import GroupNorm

    x = (3 * jax.random.normal(jax.random.key(0), (4, 8, 8, 128)) + 1.5).astype(jnp.bfloat16)
    weights = jax.random.normal(jax.random.key(3), x.shape)
    params = nn.GroupNorm(32, dtype=jnp.bfloat16).init(jax.random.key(1), x)
    params = jax.tree_util.tree_map(
        lambda p: p + 0.3 * jax.random.normal(jax.random.key(2), p.shape), params)

    def grad_x(apply):
        return np.asarray(jax.grad(lambda x: jnp.sum(apply(x).astype(jnp.float32) * weights))(x),
                          np.float64)

    with jax.enable_x64(True) if hasattr(jax, "enable_x64") else jax.experimental.enable_x64():
        p64 = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params)
        exact = np.asarray(jax.grad(lambda x: jnp.sum(
            nn.GroupNorm(32, dtype=jnp.float64, param_dtype=jnp.float64).apply(p64, x)
            * weights.astype(jnp.float64)))(x.astype(jnp.float64)))
    error = lambda g: np.sqrt(np.mean((g - exact) ** 2) / np.mean(exact ** 2))  # noqa: E731
    flax_error = error(grad_x(lambda x: nn.GroupNorm(32, dtype=jnp.bfloat16).apply(params, x)))
    written = GroupNorm(32, dtype=jnp.bfloat16)
    ours_error = error(grad_x(lambda x: written.apply(params, x, True)))
    assert ours_error < 4e-3 and ours_error <= 1.05 * flax_error  # bf16 rounding of dx only

    # Without the written gradient the same computation has JAX's forward-mode derivative too
    # (the likelihood's divergence differentiates the denoiser with jax.jvp).
    tangent = jax.random.normal(jax.random.key(4), x.shape).astype(jnp.bfloat16)
    _, jvp = jax.jvp(lambda x: written.apply(params, x), (x,), (tangent,))
    _, reference_jvp = jax.jvp(lambda x: nn.GroupNorm(32, dtype=jnp.bfloat16).apply(params, x),
                               (x,), (tangent,))
    np.testing.assert_allclose(np.asarray(jvp, np.float32), np.asarray(reference_jvp, np.float32),
                               atol=0.05)
    with pytest.raises(TypeError, match="forward-mode|jvp"):
        jax.jvp(lambda x: written.apply(params, x, True), (x,), (tangent,))
