"""A small bidirectional Transformer that embeds byte-level caption tokens.

Tokens come from :func:`diffusion_jax.text.encode`; the denoiser cross-attends to the token
embeddings and adds the pooled embedding to its noise-level embedding.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models.layers import dot_product_attention
from diffusion_jax.text import MAX_LENGTH, VOCAB_SIZE

__all__ = ["TextEncoder"]


class _EncoderBlock(nn.Module):
    """Pre-LayerNorm Transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""

    num_heads: int
    mlp_ratio: int
    dtype: jnp.dtype
    attention: str = "xla"

    @nn.compact
    def __call__(self, x, mask):
        width = x.shape[-1]
        head_dim = width // self.num_heads
        dense = lambda features, name, axis=-1: nn.DenseGeneral(
            features, axis=axis, dtype=self.dtype, param_dtype=jnp.float32, name=name)
        h = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="attention_norm")(x)
        q, k, v = (dense((self.num_heads, head_dim), name)(h) for name in ("query", "key", "value"))
        # Every query attends to the real tokens only, so padding never reaches them.
        h = dot_product_attention(q, k, v, mask=mask[:, None, None, :],
                                  implementation=self.attention)
        x = x + dense(width, "attention_out", axis=(-2, -1))(h)
        h = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="mlp_norm")(x)
        h = nn.gelu(dense(width * self.mlp_ratio, "mlp_in")(h))
        return x + dense(width, "mlp_out")(h)


class TextEncoder(nn.Module):
    """A bidirectional Transformer over byte tokens.

    ``__call__(tokens int [n, L], mask bool [n, L])`` returns ``(embeddings [n, L, width],
    pooled [n, width])`` for any L <= max_length (the learned position table has max_length rows).
    Embeddings are zero at padded positions, so cross-attention can mask them; pooled is the mean
    of the real tokens' embeddings (a bidirectional encoder has no token that summarises the text
    the way a causal model's EOS does). Neither depends on how much padding follows the text.
    Parameters are float32; the blocks compute in ``dtype``, their attention with the kernel
    ``attention`` names (see :func:`diffusion_jax.models.layers.dot_product_attention`).
    """

    vocab_size: int = VOCAB_SIZE
    max_length: int = MAX_LENGTH
    width: int = 256
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: int = 4
    dtype: jnp.dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, tokens, mask):
        if tokens.ndim != 2 or mask.shape != tokens.shape:
            raise ValueError(f"tokens and mask must both be [batch, length]; got {tokens.shape} "
                             f"and {mask.shape}")
        length = tokens.shape[1]
        if length > self.max_length:
            raise ValueError(f"{length} tokens exceed the text encoder's max_length "
                             f"{self.max_length}; encode with max_length={self.max_length}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        mask = mask.astype(bool)
        init = nn.initializers.normal(0.02)
        x = nn.Embed(self.vocab_size, self.width, embedding_init=init, param_dtype=jnp.float32,
                     name="token_embedding")(tokens)
        positions = self.param("position_embedding", init, (self.max_length, self.width),
                               jnp.float32)
        x = (x + positions[:length]).astype(self.dtype)
        for i in range(self.depth):
            block = _EncoderBlock(self.num_heads, self.mlp_ratio, self.dtype, self.attention,
                                  name=f"block_{i}")
            x = block(x, mask)
        x = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name="final_norm")(x)
        x = jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))
        count = jnp.maximum(mask.sum(axis=1, keepdims=True), 1).astype(jnp.float32)
        pooled = (x.astype(jnp.float32).sum(axis=1) / count).astype(self.dtype)
        return x, pooled
