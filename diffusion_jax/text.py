"""Text conditioning: a byte-level tokenizer (numpy, runs on the host) and a small Transformer
text encoder (Flax linen).

Tokens are UTF-8 bytes shifted past three special ids: PAD = 0, BOS = 1, EOS = 2, byte b -> b + 3,
so any string encodes without a vocabulary file and ``VOCAB_SIZE`` is 259. A caption becomes
``[BOS, bytes..., EOS, PAD, ...]``; the mask is True on BOS, the bytes and EOS.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.layers import dot_product_attention

__all__ = [
    "BOS",
    "BYTE_OFFSET",
    "EOS",
    "MAX_LENGTH",
    "PAD",
    "VOCAB_SIZE",
    "TextEncoder",
    "decode",
    "encode",
    "null_text",
]

PAD, BOS, EOS = 0, 1, 2
BYTE_OFFSET = 3
VOCAB_SIZE = 256 + BYTE_OFFSET
MAX_LENGTH = 77


def _utf8_prefix(data: bytes, limit: int) -> bytes:
    """The longest prefix of ``data`` of at most ``limit`` bytes that ends on a character
    boundary, so a truncated caption still decodes to a prefix of the original text."""
    if len(data) <= limit:
        return data
    cut = limit
    while cut > 0 and (data[cut] & 0xC0) == 0x80:  # data[cut] continues the character before it
        cut -= 1
    return data[:cut]


def encode(texts: str | Sequence[str] | np.ndarray, max_length: int = MAX_LENGTH
           ) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize ``texts`` (one string or a sequence of them) to ``(tokens int32 [n, max_length],
    mask bool [n, max_length])``. Text longer than ``max_length - 2`` bytes is cut at the last whole
    UTF-8 character that fits; BOS and EOS are always kept."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (for BOS and EOS), got {max_length}")
    if isinstance(texts, (str, bytes)):
        texts = [texts]
    texts = list(np.asarray(texts, dtype=object).reshape(-1)) if isinstance(texts, np.ndarray) \
        else list(texts)
    tokens = np.full((len(texts), max_length), PAD, np.int32)
    for row, text in enumerate(texts):
        data = text if isinstance(text, bytes) else str(text).encode("utf-8")
        data = _utf8_prefix(data, max_length - 2)
        tokens[row, 0] = BOS
        tokens[row, 1:1 + len(data)] = np.frombuffer(data, np.uint8).astype(np.int32) + BYTE_OFFSET
        tokens[row, 1 + len(data)] = EOS
    return tokens, tokens != PAD


def decode(tokens) -> list:
    """Text of each row of ``tokens`` ([n, L] or [L]): the bytes between BOS and the first EOS
    (specials and out-of-range ids are skipped); invalid UTF-8, which only a model can produce,
    decodes to U+FFFD."""
    tokens = np.atleast_2d(np.asarray(tokens))
    texts = []
    for row in tokens:
        row = row.astype(np.int64)
        ends = np.flatnonzero(row == EOS)
        if len(ends):
            row = row[:ends[0]]
        row = row[(row >= BYTE_OFFSET) & (row < VOCAB_SIZE)] - BYTE_OFFSET
        texts.append(row.astype(np.uint8).tobytes().decode("utf-8", errors="replace"))
    return texts


def null_text(max_length: int = MAX_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and mask ([1, max_length] each) of the empty caption, which stands for "no caption"
    when captions are dropped for classifier-free guidance; broadcasts against a batch."""
    return encode([""], max_length)


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
