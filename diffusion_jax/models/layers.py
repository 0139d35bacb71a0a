"""Building blocks shared by the denoisers (Flax linen, NHWC, float32 parameters)."""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["sinusoidal_embedding", "upsample_nearest", "group_norm", "GroupNorm", "FrameConv",
           "NoiseLevelEmbedding", "MultiHeadSelfAttention",
           "MultiHeadCrossAttention", "GEGLUFeedForward", "add_class_embedding",
           "add_pooled_embedding", "prepare_context"]

Dtype = Any


def sinusoidal_embedding(values, dim: int, max_period: float = 10_000.0):
    """Transformer-style sinusoidal features of a [batch] array.

    [cos(v f_k), sin(v f_k)] with frequencies f_k = max_period^(-k / (dim/2)) (Vaswani et al.
    2017; the DDPM time embedding)."""
    if dim % 2:
        raise ValueError(f"embedding dimension must be even, got {dim}")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(values, jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def upsample_nearest(x, factor: int = 2, axes=None):
    """Nearest-neighbour upsampling of channels-last ``x`` by an integer ``factor``.

    ``axes`` are the upsampled axes (default: every axis between the batch and the channels,
    i.e. height and width of NHWC images, the length of [batch, length, channels] signals).
    Every pixel is repeated ``factor`` times along each. The same values as
    ``jax.image.resize(..., "nearest")``, but as a broadcast and a reshape, so its gradient is a sum
    over each block of pixels; resize's index gather differentiates to a scatter-add with non-unique
    indices (atomics on a GPU)."""
    axes = tuple(range(1, x.ndim - 1)) if axes is None else tuple(axes)
    expanded, shape, out_shape = [], [], []
    for axis, size in enumerate(x.shape):
        expanded.append(slice(None))
        shape.append(size)
        out_shape.append(size * factor if axis in axes else size)
        if axis in axes:
            expanded.append(None)
            shape.append(factor)
    return jnp.broadcast_to(x[tuple(expanded)], tuple(shape)).reshape(out_shape)


def _group_statistics(x, num_groups: int):
    """Per-(example, group) mean and reciprocal standard deviation factors of NHWC ``x``.

    In float32, from per-channel sums over the spatial axes (one pass over ``x``)."""
    batch, channels = x.shape[0], x.shape[-1]
    spatial = tuple(range(1, x.ndim - 1))
    xf = x.astype(jnp.float32)
    per_channel = jnp.stack([jnp.sum(xf, axis=spatial), jnp.sum(xf * xf, axis=spatial)])
    count = math.prod(x.shape[1:-1]) * (channels // num_groups)
    sums = per_channel.reshape(2, batch, num_groups, channels // num_groups).sum(-1) / count
    mean, mean_square = sums[0], sums[1]
    return mean, jnp.maximum(mean_square - mean * mean, 0.0)


def _per_channel(values, channels: int, spatial: int = 2):
    """[batch, groups] -> [batch, 1, ..., 1, channels] (each group's value for its channels).

    ``spatial`` is the number of 1-axes (2 for NHWC images)."""
    batch, groups = values.shape
    return jnp.repeat(values, channels // groups, axis=-1).reshape(
        (batch,) + (1,) * spatial + (channels,))


def _group_norm_forward(x, scale, bias, num_groups, epsilon, dtype):
    channels = x.shape[-1]
    mean, var = _group_statistics(x, num_groups)
    inv = jax.lax.rsqrt(var + epsilon)
    spatial = x.ndim - 2
    mean_c, inv_c = _per_channel(mean, channels, spatial), _per_channel(inv, channels, spatial)
    y = (x - mean_c) * (inv_c * scale) + bias  # float32 (mean and scale are), as Flax's
    return y.astype(dtype), (x, mean, inv, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm(x, scale, bias, num_groups: int, epsilon: float, dtype):
    """Group normalisation (Wu & He 2018) of channels-last ``x``, with a written-out gradient.

    Each example's channels in ``num_groups`` groups, normalised by the group's mean and variance
    over the spatial axes and its channels (in float32), then ``* scale + bias`` per channel
    (``scale`` and ``bias`` [channels]); the result in ``dtype``. The same values as
    ``flax.linen.GroupNorm`` up to float32 round-off.

    Its gradient is written out (``jax.custom_vjp``) rather than derived: one pass over ``x``
    and the incoming gradient for their per-channel sums, then one elementwise pass,
    ``dx = r (g - mean(g) - x_hat mean(g x_hat))`` with ``g = scale * dy`` and ``r`` the group's
    reciprocal standard deviation. Derived, XLA compiled each normalisation's backward into two
    passes and half a dozen small kernels (reductions over the groups), which on a GPU cost
    more in launches than in arithmetic."""
    return _group_norm_forward(x, scale, bias, num_groups, epsilon, dtype)[0]


def _group_norm_fwd(x, scale, bias, num_groups, epsilon, dtype):
    return _group_norm_forward(x, scale, bias, num_groups, epsilon, dtype)


def _group_norm_bwd(num_groups, epsilon, dtype, residuals, dy):
    del epsilon, dtype
    x, mean, inv, scale = residuals
    batch, channels = x.shape[0], x.shape[-1]
    spatial = tuple(range(1, x.ndim - 1))
    size = channels // num_groups
    count = math.prod(x.shape[1:-1]) * size
    dyf, xf = dy.astype(jnp.float32), x.astype(jnp.float32)
    # The only pass over x and dy before the last: per-channel sums of dy and dy * x. (Pairs of
    # reductions are stacked so that each pair compiles to one kernel.)
    sums = jnp.stack([jnp.sum(dyf, axis=spatial), jnp.sum(dyf * xf, axis=spatial)])
    mean_c = jnp.repeat(mean, size, axis=-1)
    inv_c = jnp.repeat(inv, size, axis=-1)
    sum_dy_xhat = (sums[1] - mean_c * sums[0]) * inv_c  # per channel: sum of dy * x_hat
    per_channel = jnp.stack([sums[0], sum_dy_xhat])  # [2, batch, channels]
    grad_bias, grad_scale = per_channel.sum(axis=1)
    flat_scale = scale.reshape(channels)
    # Group means of g = scale * dy and of g * x_hat.
    mean_g, mean_g_xhat = (per_channel * flat_scale).reshape(
        2, batch, num_groups, size).sum(-1) / count
    # dx = r g - r mean_g - r x_hat mean_g_xhat, with x_hat = (x - mean) r: one multiply-add
    # of dy and x with per-(example, channel) coefficients.
    ones = (1,) * (x.ndim - 2)
    coef_dy = (inv_c * flat_scale).reshape((batch,) + ones + (channels,))
    coef_x = _per_channel(-inv * inv * mean_g_xhat, channels, len(ones))
    offset = _per_channel(inv * inv * mean_g_xhat * mean - inv * mean_g, channels, len(ones))
    dx = dyf * coef_dy + xf * coef_x + offset
    return (dx.astype(x.dtype), grad_scale.reshape(scale.shape).astype(scale.dtype),
            grad_bias.reshape(scale.shape).astype(scale.dtype))


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
    """``flax.linen.GroupNorm`` for channels-last inputs, with an optional written-out gradient.

    Any number of spatial axes: NHWC images, [batch, length, channels] signals, video.

    The same parameters (``scale`` and ``bias``, float32, one per channel) and epsilon, so
    checkpoints and parameter trees are unchanged; output in ``dtype`` (default, as Flax's: the
    input's dtype promoted with float32).

    ``__call__(x, written_gradient=False)``: with ``written_gradient`` (the denoisers pass it in
    training) through :func:`group_norm`, whose reverse-mode gradient is written out and
    compiles to fewer, larger kernels; a ``jax.custom_vjp`` function cannot be differentiated
    in forward mode, so otherwise (sampling, and the likelihood's divergence, which uses
    ``jax.jvp``) the same forward computation is differentiated by JAX."""

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Optional[Dtype] = None
    per_frame: bool = False  # [batch, frames, ..., channels] clips: each frame's own statistics

    @nn.compact
    def __call__(self, x, written_gradient: bool = False):
        channels = x.shape[-1]
        if x.ndim < 3 + self.per_frame:
            raise ValueError(f"GroupNorm expects channels-last inputs with spatial axes "
                             f"([batch, {'frames, ' if self.per_frame else ''}..., channels]), "
                             f"got shape {x.shape}")
        if channels % self.num_groups:
            raise ValueError(f"{channels} channels do not split into {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        dtype = jnp.dtype(jnp.promote_types(x.dtype, jnp.float32) if self.dtype is None
                          else self.dtype)
        shape = x.shape
        if self.per_frame:  # the frames as a batch of images
            x = x.reshape((shape[0] * shape[1],) + shape[2:])
        if written_gradient:
            out = group_norm(x, scale, bias, self.num_groups, self.epsilon, dtype)
        else:
            out = _group_norm_forward(x, scale, bias, self.num_groups, self.epsilon, dtype)[0]
        return out.reshape(shape)


class FrameConv(nn.Module):
    """``nn.Conv`` with a [1, kh, kw] kernel on clips, computed as 2-D convolutions of the frames.

    Takes what ``nn.Conv`` takes for [batch, frames, height, width, channels] inputs (a kernel
    size, strides and padding with 1 and no padding along the frames) and makes the same
    parameters (``kernel`` of shape [1, kh, kw, in, out], ``bias``) and the same output, but
    folds the frames into the batch: XLA runs that 2-D convolution faster than the 3-D one (on a
    CPU, 30% less time for a forward and backward pass of the CPU preset's network)."""

    features: int
    kernel_size: tuple
    strides: Union[int, tuple] = 1
    padding: Any = "SAME"
    dtype: Any = None
    kernel_init: Callable = nn.linear.default_kernel_init
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x):
        strides = (self.strides,) * 3 if isinstance(self.strides, int) else tuple(self.strides)
        padding = self.padding if isinstance(self.padding, str) else tuple(self.padding)
        across_frames = strides[0] != 1 or (
            not isinstance(padding, str) and tuple(padding[0]) != (0, 0))
        if x.ndim != 5 or len(self.kernel_size) != 3 or self.kernel_size[0] != 1 or across_frames:
            raise ValueError(f"FrameConv convolves each frame of [batch, frames, height, width, "
                             f"channels] clips alone; got input {x.shape}, kernel "
                             f"{self.kernel_size}, strides {strides}, padding {self.padding}")
        kernel = self.param("kernel", self.kernel_init,
                            tuple(self.kernel_size) + (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        dtype = jnp.result_type(x, kernel) if self.dtype is None else self.dtype
        batch, frames = x.shape[:2]
        images = x.reshape((batch * frames,) + x.shape[2:]).astype(dtype)
        # Cast, then drop the frame axis: a cast as the kernel's first use is what lets the
        # samplers cast it once before their loop (generate.cast_params_once).
        y = jax.lax.conv_general_dilated(
            images, kernel.astype(dtype)[0], strides[1:],
            padding if isinstance(padding, str) else padding[1:],
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = y + bias.astype(dtype)
        return y.reshape((batch, frames) + y.shape[1:])


class NoiseLevelEmbedding(nn.Module):
    """Noise level -> sinusoidal features -> Dense -> SiLU -> Dense.

    ``scale`` multiplies the network's noise input first: 1000 for t in [0, 1] (DDPM's integer
    timesteps), about 250 for EDM's c_noise = log(sigma) / 4; ``shift`` is added after (-1 for
    networks trained on diffusers' timestep k = 1000 t - 1).
    """

    features: int
    frequency_dim: int
    scale: float = 1000.0
    dtype: Dtype = jnp.float32
    shift: float = 0.0

    @nn.compact
    def __call__(self, noise_level):
        emb = sinusoidal_embedding(noise_level * self.scale + self.shift, self.frequency_dim)
        emb = nn.Dense(self.features, dtype=self.dtype, name="dense_0")(emb)
        emb = nn.Dense(self.features, dtype=self.dtype, name="dense_1")(nn.silu(emb))
        return emb


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "auto")
_TARGET_PLATFORM = []  # set by compiling_for


@contextlib.contextmanager
def compiling_for(platform: str):
    """Choose attention kernels for ``platform`` ("gpu", "cpu", ...) while tracing.

    Used instead of this process's default backend, for compiling a program for a GPU on a machine
    without one (benchmarks/compiled_kernels.py)."""
    _TARGET_PLATFORM.append(platform)
    try:
        yield
    finally:
        _TARGET_PLATFORM.pop()


def _cudnn_attention(query, key, value, mask):
    """cuDNN's fused attention, or the error JAX raises where it cannot run these shapes.

    Its backward pass takes fewer shapes than its forward pass (with a mask, no odd lengths: Stable
    Diffusion's 77 text tokens), and JAX checks that only where the attention is differentiated,
    after this function has returned; so both passes are traced here first, on shapes alone."""
    def attend(q, k, v, m):
        return jax.nn.dot_product_attention(q, k, v, mask=m, implementation="cudnn")

    def forward_and_backward(q, k, v, m):
        out, backward = jax.vjp(lambda q, k, v: attend(q, k, v, m), q, k, v)
        return backward(out)

    jax.eval_shape(forward_and_backward, *(
        None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype)
        for a in (query, key, value, mask)))
    return attend(query, key, value, mask)


def dot_product_attention(query, key, value, mask=None, implementation: str = "xla"):
    """``jax.nn.dot_product_attention`` with the kernel chosen by ``implementation``.

    Inputs are [batch, length, heads, head_dim]. ``implementation`` is "xla" (any backend and
    dtype), "cudnn" (cuDNN's fused flash attention: a GPU, bf16/fp16 inputs, and shapes cuDNN
    supports in the forward and the backward pass; anything else is a ValueError saying so) or
    "auto" (cuDNN where those hold, else XLA)."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of "
                         f"{ATTENTION_IMPLEMENTATIONS}, got {implementation!r}")
    if implementation != "xla":
        platform = _TARGET_PLATFORM[-1] if _TARGET_PLATFORM else jax.default_backend()
        usable = platform == "gpu" and query.dtype in (jnp.bfloat16, jnp.float16)
        if usable:
            try:
                return _cudnn_attention(query, key, value, mask)
            except (RuntimeError, NotImplementedError, ValueError) as err:
                if implementation == "cudnn":
                    raise ValueError(
                        f"cuDNN attention cannot run query {query.shape} {query.dtype} / key "
                        f"{key.shape} here ({err}); use model.attention='auto' or 'xla'"
                    ) from err
        elif implementation == "cudnn":
            raise ValueError(
                f"cuDNN attention needs a GPU and bfloat16/float16 inputs; this is "
                f"{platform} with {query.dtype} (model.dtype='bfloat16' on a GPU, "
                "or model.attention='auto' or 'xla')")
    return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation="xla")


class MultiHeadSelfAttention(nn.Module):
    """Self-attention over the token axis of [batch, tokens, channels].

    Computed with :func:`dot_product_attention` (``attention`` picks XLA's or cuDNN's fused
    kernel). ``mask`` [batch, tokens], if given, leaves out the keys where it is False (the
    absent members of a set)."""

    num_heads: int
    dtype: Dtype = jnp.float32
    out_kernel_init: Optional[Any] = None
    qkv_bias: bool = True
    attention: str = "xla"

    @nn.compact
    def __call__(self, tokens, mask=None):
        batch, length, channels = tokens.shape
        if channels % self.num_heads:
            raise ValueError(f"{channels} channels do not split into {self.num_heads} heads")
        head_dim = channels // self.num_heads
        qkv = nn.Dense(3 * channels, use_bias=self.qkv_bias, dtype=self.dtype, name="qkv")(tokens)
        qkv = qkv.reshape(batch, length, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if mask is not None:
            mask = jnp.asarray(mask, bool)[:, None, None, :]
        out = dot_product_attention(q, k, v, mask, implementation=self.attention)
        out = out.reshape(batch, length, channels)
        kwargs = {} if self.out_kernel_init is None else {"kernel_init": self.out_kernel_init}
        return nn.Dense(channels, dtype=self.dtype, name="out", **kwargs)(out)


class MultiHeadCrossAttention(nn.Module):
    """Attention from query tokens [batch, tokens, channels] to a context [batch, length, dim].

    The context is text-token embeddings, with an optional key mask [batch, length] (True = a real
    token). Queries come from the tokens, keys and values from the context, both projected to
    ``channels`` and split into ``num_heads`` heads; ``jax.nn.dot_product_attention`` takes them
    in [batch, length, heads, head_dim] layout and the mask broadcast to [batch, 1, 1, length]
    (its [batch, heads, queries, keys] order).

    A row whose keys are all masked has nothing to attend to: its output is exactly zero (out
    projection and bias included), so a residual cross-attention sub-layer leaves such an example
    untouched, as if it had no context. The kernel itself never sees an all-masked row (that row
    attends to every key instead and the result is discarded), so no backend can produce NaN.
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    out_kernel_init: Optional[Any] = None
    qkv_bias: bool = True
    attention: str = "xla"

    @nn.compact
    def __call__(self, tokens, context, mask=None):
        batch, length, channels = tokens.shape
        if channels % self.num_heads:
            raise ValueError(f"{channels} channels do not split into {self.num_heads} heads")
        if context.ndim != 3 or context.shape[0] != batch:
            raise ValueError(f"context must be [batch={batch}, length, dim], got {context.shape}")
        head_dim = channels // self.num_heads
        context_length = context.shape[1]
        query = nn.Dense(channels, use_bias=self.qkv_bias, dtype=self.dtype, name="query")(tokens)
        key_value = nn.Dense(2 * channels, use_bias=self.qkv_bias, dtype=self.dtype,
                             name="key_value")(context)
        query = query.reshape(batch, length, self.num_heads, head_dim)
        key_value = key_value.reshape(batch, context_length, 2, self.num_heads, head_dim)
        key, value = key_value[:, :, 0], key_value[:, :, 1]
        if mask is None:
            out = dot_product_attention(query, key, value, implementation=self.attention)
        else:
            mask = jnp.asarray(mask, bool)
            if mask.shape != (batch, context_length):
                raise ValueError(f"context mask must be [batch, length] = "
                                 f"{(batch, context_length)}, got {mask.shape}")
            has_tokens = jnp.any(mask, axis=-1)
            safe_mask = mask | ~has_tokens[:, None]
            out = dot_product_attention(query, key, value, mask=safe_mask[:, None, None, :],
                                        implementation=self.attention)
        out = out.reshape(batch, length, channels)
        kwargs = {} if self.out_kernel_init is None else {"kernel_init": self.out_kernel_init}
        out = nn.Dense(channels, dtype=self.dtype, name="out", **kwargs)(out)
        if mask is not None:
            out = jnp.where(has_tokens[:, None, None], out, jnp.zeros((), out.dtype))
        return out


class GEGLUFeedForward(nn.Module):
    """The transformer feed-forward of Stable Diffusion's UNet: Dense -> GEGLU -> Dense.

    GEGLU is a GELU-gated linear unit (Shazeer 2020); the widths are channels ->
    2 x (mult x channels) -> channels."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    out_kernel_init: Optional[Any] = None

    @nn.compact
    def __call__(self, tokens):
        channels = tokens.shape[-1]
        hidden, gate = jnp.split(
            nn.Dense(2 * self.mult * channels, dtype=self.dtype, name="proj_in")(tokens), 2,
            axis=-1)
        kwargs = {} if self.out_kernel_init is None else {"kernel_init": self.out_kernel_init}
        return nn.Dense(channels, dtype=self.dtype, name="proj_out", **kwargs)(
            hidden * nn.gelu(gate, approximate=False))


def prepare_context(context, context_mask, context_dim: Optional[int], batch: int, dtype,
                    model_name: str):
    """Check a text context [batch, length, context_dim] and its mask against the model.

    Without ``context_dim`` the model has no cross-attention and a context is an error. With it,
    ``context=None`` means "no text": one placeholder token that is masked out, so that every
    cross-attention sub-layer contributes exactly zero (the same as an all-False mask) and ``init``
    works without a context. Returns (context in ``dtype``, mask or None).
    """
    if context_dim is None:
        if context is not None or context_mask is not None:
            raise ValueError(f"a context was given but the {model_name} has no context_dim "
                             "(no cross-attention)")
        return None, None
    if context is None:
        if context_mask is not None:
            raise ValueError("context_mask was given without a context")
        return (jnp.zeros((batch, 1, context_dim), dtype), jnp.zeros((batch, 1), bool))
    context = jnp.asarray(context)
    if context.ndim != 3 or context.shape[0] != batch or context.shape[-1] != context_dim:
        raise ValueError(f"the {model_name} expects a context [batch={batch}, length, "
                         f"context_dim={context_dim}], got {context.shape}")
    if context_mask is not None:
        context_mask = jnp.asarray(context_mask, bool)
        if context_mask.shape != context.shape[:2]:
            raise ValueError(f"context_mask must be [batch, length] = {context.shape[:2]}, "
                             f"got {context_mask.shape}")
    return context.astype(dtype), context_mask


def add_pooled_embedding(emb, pooled, pooled_dim: Optional[int], dtype, model_name: str):
    """Add a Dense projection of a pooled text embedding [batch, pooled_dim] to ``emb``.

    Call it inside a compact method. ``pooled=None`` is a zero vector (the projection's bias
    only)."""
    if pooled_dim is None:
        if pooled is not None:
            raise ValueError(f"pooled was given but the {model_name} has no pooled_dim")
        return emb
    if pooled is None:
        pooled = jnp.zeros((emb.shape[0], pooled_dim), dtype)
    elif pooled.shape != (emb.shape[0], pooled_dim):
        raise ValueError(f"the {model_name} expects pooled [batch={emb.shape[0]}, "
                         f"pooled_dim={pooled_dim}], got {pooled.shape}")
    return emb + nn.Dense(emb.shape[-1], dtype=dtype, name="pooled_embedding")(
        jnp.asarray(pooled).astype(dtype))


def add_class_embedding(emb, labels, num_classes: Optional[int], dtype, model_name: str):
    """Add a learned class embedding to ``emb`` [batch, features] (call inside a compact method).

    Label ``num_classes`` is the null label for classifier-free guidance; ``labels=None`` means
    every example is unconditional.
    """
    if num_classes is None:
        if labels is not None:
            raise ValueError(f"labels were given but the {model_name} has no num_classes")
        return emb
    if labels is None:
        labels = jnp.full(emb.shape[:1], num_classes, jnp.int32)
    return emb + nn.Embed(num_classes + 1, emb.shape[-1], dtype=dtype,
                          name="class_embedding")(labels)
