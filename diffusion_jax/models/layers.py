"""Building blocks shared by the denoisers (Flax linen, NHWC, float32 parameters)."""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["sinusoidal_embedding", "NoiseLevelEmbedding", "MultiHeadSelfAttention",
           "add_class_embedding"]

Dtype = Any


def sinusoidal_embedding(values, dim: int, max_period: float = 10_000.0):
    """Transformer-style sinusoidal features of a [batch] array: [cos(v f_k), sin(v f_k)] with
    frequencies f_k = max_period^(-k / (dim/2)) (Vaswani et al. 2017; the DDPM time embedding)."""
    if dim % 2:
        raise ValueError(f"embedding dimension must be even, got {dim}")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(values, jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class NoiseLevelEmbedding(nn.Module):
    """Noise level -> sinusoidal features -> Dense -> SiLU -> Dense.

    ``scale`` multiplies the network's noise input first: 1000 for t in [0, 1] (DDPM's integer
    timesteps), about 250 for EDM's c_noise = log(sigma) / 4.
    """

    features: int
    frequency_dim: int
    scale: float = 1000.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, noise_level):
        emb = sinusoidal_embedding(noise_level * self.scale, self.frequency_dim)
        emb = nn.Dense(self.features, dtype=self.dtype, name="dense_0")(emb)
        emb = nn.Dense(self.features, dtype=self.dtype, name="dense_1")(nn.silu(emb))
        return emb


class MultiHeadSelfAttention(nn.Module):
    """Self-attention over the token axis of [batch, tokens, channels] with
    ``jax.nn.dot_product_attention`` (a fused kernel on GPU where available)."""

    num_heads: int
    dtype: Dtype = jnp.float32
    out_kernel_init: Optional[Any] = None

    @nn.compact
    def __call__(self, tokens):
        batch, length, channels = tokens.shape
        if channels % self.num_heads:
            raise ValueError(f"{channels} channels do not split into {self.num_heads} heads")
        head_dim = channels // self.num_heads
        qkv = nn.Dense(3 * channels, dtype=self.dtype, name="qkv")(tokens)
        qkv = qkv.reshape(batch, length, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = jax.nn.dot_product_attention(q, k, v)
        out = out.reshape(batch, length, channels)
        kwargs = {} if self.out_kernel_init is None else {"kernel_init": self.out_kernel_init}
        return nn.Dense(channels, dtype=self.dtype, name="out", **kwargs)(out)


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
