"""Byte-level tokenizer and the Transformer text encoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import models, text

# Code point ranges: ASCII, Latin-1/Latin Extended (2 bytes), CJK (3 bytes), emoji (4 bytes).
_RANGES = ((0x20, 0x7F), (0x80, 0x800), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF))


def _random_strings(seed, count, max_chars):
    rng = np.random.default_rng(seed)
    strings = []
    for _ in range(count):
        chars = []
        for _ in range(rng.integers(0, max_chars + 1)):
            if rng.random() < 0.1:  # anything outside the surrogates, control characters included
                code = int(rng.integers(0, 0x110000 - 0x800))
                code += 0x800 if code >= 0xD800 else 0
            else:
                low, high = _RANGES[rng.integers(len(_RANGES))]
                code = int(rng.integers(low, high))
            chars.append(chr(code))
        strings.append("".join(chars))
    return strings


def test_round_trip_random_utf8():
    texts = _random_strings(0, 500, 30) + [
        "", "a", "héllo wörld", "日本語のテキスト", "👍🏽 ok 🎉", "\x00nul inside", "tab\tnew\nline"]
    tokens, mask = text.encode(texts, max_length=4 * 30 + 2)
    assert tokens.dtype == np.int32 and mask.dtype == np.bool_
    assert tokens.shape == mask.shape == (len(texts), 122)
    assert tokens.min() >= 0 and tokens.max() < text.VOCAB_SIZE
    assert text.decode(tokens) == texts


def test_mask_and_layout():
    texts = ["", "abc", "é"]
    tokens, mask = text.encode(texts, max_length=8)
    np.testing.assert_array_equal(mask, tokens != text.PAD)
    np.testing.assert_array_equal(mask.sum(1), [2, 5, 4])
    np.testing.assert_array_equal(tokens[1], [text.BOS, 97 + 3, 98 + 3, 99 + 3, text.EOS, 0, 0, 0])
    np.testing.assert_array_equal(tokens[2, :4], [text.BOS, 0xC3 + 3, 0xA9 + 3, text.EOS])
    # One string is a batch of one; decode accepts a single row.
    single, _ = text.encode("abc", max_length=8)
    np.testing.assert_array_equal(single, tokens[1:2])
    assert text.decode(tokens[1]) == ["abc"]
    # numpy arrays of strings, as a batch of captions arrives from the data pipeline.
    batched, _ = text.encode(np.array(["", "abc", "é"]), max_length=8)
    np.testing.assert_array_equal(batched, tokens)


def test_truncation_keeps_eos_and_whole_characters():
    tokens, mask = text.encode(["abcdefghijklmnop"], max_length=10)
    assert mask.all() and tokens[0, 0] == text.BOS and tokens[0, -1] == text.EOS
    assert text.decode(tokens) == ["abcdefgh"]
    # "日" is three bytes: 6 bytes of room hold two characters, 5 bytes only one.
    assert text.decode(text.encode("日本語", max_length=8)[0]) == ["日本"]
    tokens, mask = text.encode("日本語", max_length=7)
    assert text.decode(tokens) == ["日"] and mask.sum() == 5 and tokens[0, 4] == text.EOS
    for t in _random_strings(1, 200, 20):
        for max_length in (2, 5, 17):
            decoded = text.decode(text.encode(t, max_length=max_length)[0])[0]
            assert t.startswith(decoded) and len(decoded.encode()) <= max_length - 2
    with pytest.raises(ValueError, match="max_length"):
        text.encode("a", max_length=1)


def test_decode_tolerates_model_output():
    # Junk after EOS, stray specials and an invalid byte sequence, as a sampler might emit.
    tokens = np.array([[text.BOS, 104 + 3, text.PAD, 105 + 3, 0xFF + 3, text.EOS, 120]])
    assert text.decode(tokens) == ["hi\ufffd"]


def test_null_text():
    tokens, mask = text.null_text(16)
    assert tokens.shape == mask.shape == (1, 16)
    assert text.decode(tokens) == [""] and mask.sum() == 2


def _small_encoder(**kwargs):
    return models.TextEncoder(width=32, depth=2, num_heads=2, mlp_ratio=2, **kwargs)


# Each fits in 16 tokens (14 bytes), so 16 and 77 tokens hold the same text.
TEXTS = ["a red circle", "", "two blue 🟦", "日本"]


@pytest.fixture(scope="module")
def encoder():
    """The model, its parameters and one jitted apply shared by the tests (one compile a shape)."""
    model = _small_encoder()
    tokens, mask = text.encode(TEXTS, max_length=77)
    params = jax.jit(model.init)(jax.random.key(0), tokens, mask)
    return model, params, jax.jit(model.apply)


def test_encoder_shapes_and_parameter_dtype(encoder):
    _, params, apply = encoder
    tokens, mask = text.encode(TEXTS, max_length=77)
    embeddings, pooled = apply(params, tokens, mask)
    assert embeddings.shape == (4, 77, 32) and pooled.shape == (4, 32)
    assert embeddings.dtype == pooled.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    np.testing.assert_array_equal(np.asarray(embeddings)[~mask], 0.0)
    assert np.isfinite(np.asarray(pooled)).all()
    # Different captions give different conditioning.
    assert np.abs(np.asarray(pooled[0] - pooled[2])).max() > 1e-3


def test_encoder_padding_invariance(encoder):
    _, params, apply = encoder
    short_tokens, short_mask = text.encode(TEXTS, max_length=16)
    long_tokens, long_mask = text.encode(TEXTS, max_length=77)
    assert not short_mask[:, -1].any()  # nothing was truncated
    short, short_pooled = apply(params, short_tokens, short_mask)
    long, long_pooled = apply(params, long_tokens, long_mask)
    np.testing.assert_allclose(np.asarray(long[:, :16]), np.asarray(short), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(long[:, 16:]), 0.0)
    np.testing.assert_allclose(np.asarray(long_pooled), np.asarray(short_pooled), atol=1e-5)
    # Whatever sits under the mask is ignored.
    junk = np.where(long_mask, long_tokens,
                    np.random.default_rng(0).integers(0, text.VOCAB_SIZE, long_tokens.shape))
    junk_embeddings, junk_pooled = apply(params, junk, long_mask)
    np.testing.assert_allclose(np.asarray(junk_embeddings), np.asarray(long), atol=1e-5)
    np.testing.assert_allclose(np.asarray(junk_pooled), np.asarray(long_pooled), atol=1e-5)


def test_encoder_jit_matches_eager(encoder):
    model, params, apply = encoder
    tokens, mask = text.encode(TEXTS[:2], max_length=4)
    eager = model.apply(params, tokens, mask)
    jitted = apply(params, tokens, mask)
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_encoder_bfloat16(encoder):
    _, params, apply = encoder
    model = _small_encoder(dtype=jnp.bfloat16)
    tokens, mask = text.encode(TEXTS, max_length=16)
    embeddings, pooled = jax.jit(model.apply)(params, tokens, mask)
    assert embeddings.dtype == pooled.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(embeddings, np.float32)[~mask], 0.0)
    reference = apply(params, tokens, mask)[1]
    np.testing.assert_allclose(np.asarray(pooled, np.float32), np.asarray(reference), atol=0.1)


def test_encoder_rejects_bad_inputs(encoder):
    model, params, _ = encoder
    tokens, mask = text.encode(TEXTS, max_length=78)
    with pytest.raises(ValueError, match="max_length"):
        model.apply(params, tokens, mask)
    with pytest.raises(ValueError, match="num_heads"):
        models.TextEncoder(width=30, num_heads=4).init(jax.random.key(0), tokens[:, :8],
                                                         mask[:, :8])
