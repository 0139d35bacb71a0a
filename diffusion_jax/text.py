"""Byte-level text tokenizer: captions to token ids and masks (numpy, runs on the host).

The Transformer that embeds these tokens is :class:`diffusion_jax.models.TextEncoder`.

Tokens are UTF-8 bytes shifted past three special ids: PAD = 0, BOS = 1, EOS = 2, byte b -> b + 3,
so any string encodes without a vocabulary file and ``VOCAB_SIZE`` is 259. A caption becomes
``[BOS, bytes..., EOS, PAD, ...]``; the mask is True on BOS, the bytes and EOS.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "BOS",
    "BYTE_OFFSET",
    "EOS",
    "MAX_LENGTH",
    "PAD",
    "VOCAB_SIZE",
    "decode",
    "encode",
    "null_text",
]

PAD, BOS, EOS = 0, 1, 2
BYTE_OFFSET = 3
VOCAB_SIZE = 256 + BYTE_OFFSET
MAX_LENGTH = 77


def _utf8_prefix(data: bytes, limit: int) -> bytes:
    """The longest prefix of ``data`` of at most ``limit`` bytes that ends on a character boundary.

    Cut there, a truncated caption still decodes to a prefix of the original text."""
    if len(data) <= limit:
        return data
    cut = limit
    while cut > 0 and (data[cut] & 0xC0) == 0x80:  # data[cut] continues the character before it
        cut -= 1
    return data[:cut]


def encode(texts: str | Sequence[str] | np.ndarray, max_length: int = MAX_LENGTH
           ) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize ``texts`` (one string or a sequence of them) to byte tokens and a mask.

    Returns ``(tokens int32 [n, max_length], mask bool [n, max_length])``. Text longer than
    ``max_length - 2`` bytes is cut at the last whole UTF-8 character that fits; BOS and EOS are
    always kept."""
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
    """Text of each row of ``tokens`` ([n, L] or [L]).

    The bytes between BOS and the first EOS (specials and out-of-range ids are skipped); invalid
    UTF-8, which only a model can produce, decodes to U+FFFD."""
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
    """Tokens and mask ([1, max_length] each) of the empty caption.

    It stands for "no caption" when captions are dropped for classifier-free guidance, and
    broadcasts against a batch."""
    return encode([""], max_length)
