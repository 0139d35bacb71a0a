"""CLIP's text Transformer (Radford et al. 2021), the text encoder of Stable Diffusion and SDXL.

From "Learning Transferable Visual Models From Natural Language Supervision": a causal,
pre-LayerNorm Transformer over BPE tokens with learned position embeddings. Its outputs are every
layer's hidden states (the conditioning of a latent diffusion UNet: the final layer-normed
states for SD 1.x/2.x, the penultimate layer's for SDXL) and a pooled vector taken
at the end-of-text token, optionally projected (SDXL's second encoder, ``text_embeds``).

Submodules are named after the state-dict names of the published checkpoints
(``embeddings/token_embedding``, ``encoder/layers_0/self_attn/q_proj``, ``final_layer_norm``,
``text_projection``), so :mod:`diffusion_jax.pretrained.clip_text` converts a checkpoint by
renaming its tensors. Parameters are float32; ``dtype`` is the computation dtype.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import dot_product_attention

__all__ = ["CLIPTextTransformer", "CLIPTextOutput", "ACTIVATIONS", "quick_gelu"]

Dtype = Any


def quick_gelu(x):
    """The sigmoid approximation of GELU that CLIP was trained with: x * sigmoid(1.702 x).

    Hendrycks & Gimpel 2016, section 2; OpenAI's CLIP and SD 1.x's text encoder use it."""
    return x * jax.nn.sigmoid(1.702 * x)


def _exact_gelu(x):
    """GELU with the exact Gaussian CDF, x * Phi(x) (OpenCLIP's encoders: SD 2.x, SDXL)."""
    return jax.nn.gelu(x, approximate=False)


# config.json hidden_act -> the function, as transformers defines each name.
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": _exact_gelu}


class CLIPTextOutput(NamedTuple):
    """What :class:`CLIPTextTransformer` returns (arrays in the computation dtype).

    ``last_hidden_state`` [batch, length, hidden]: the last layer's output after the final
    LayerNorm. ``hidden_states``: num_layers + 1 arrays like it, the embeddings and then each
    layer's output, none of them normalised (SDXL conditions on ``hidden_states[-2]``).
    ``pooled`` [batch, hidden]: ``last_hidden_state`` at the end-of-text token. ``text_embeds``
    [batch, projection_dim]: ``pooled`` through ``text_projection``, or None without one."""

    last_hidden_state: jax.Array
    hidden_states: tuple
    pooled: jax.Array
    text_embeds: Optional[jax.Array]


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus a learned absolute position embedding."""

    vocab_size: int
    hidden_size: int
    max_positions: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        init = nn.initializers.normal(0.02)
        tokens = nn.Embed(self.vocab_size, self.hidden_size, embedding_init=init,
                          dtype=self.dtype, param_dtype=jnp.float32,
                          name="token_embedding")(input_ids)
        positions = nn.Embed(self.max_positions, self.hidden_size, embedding_init=init,
                             dtype=self.dtype, param_dtype=jnp.float32,
                             name="position_embedding")(jnp.arange(input_ids.shape[1]))
        return tokens + positions[None]


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v/out projections (all with biases)."""

    hidden_size: int
    num_heads: int
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x):
        batch, length, _ = x.shape
        head_dim = self.hidden_size // self.num_heads
        dense = lambda name: nn.Dense(self.hidden_size, dtype=self.dtype,
                                      param_dtype=jnp.float32, name=name)
        q, k, v = (dense(name)(x).reshape(batch, length, self.num_heads, head_dim)
                   for name in ("q_proj", "k_proj", "v_proj"))
        # Token i sees tokens 0..i only: CLIP's text model is autoregressive in shape (its pooled
        # state at the end-of-text token has read the whole prompt, padding after it none).
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
        # jax.nn.dot_product_attention scales by head_dim ** -0.5 and takes the softmax in float32.
        out = dot_product_attention(q, k, v, mask=causal, implementation=self.attention)
        return dense("out_proj")(out.reshape(batch, length, self.hidden_size))


class CLIPMLP(nn.Module):
    """The feed-forward block: fc1, the activation, fc2."""

    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.intermediate_size, dtype=self.dtype, param_dtype=jnp.float32,
                     name="fc1")(x)
        h = ACTIVATIONS[self.hidden_act](h)
        return nn.Dense(self.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
                        name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm block: x + attention(LN1(x)), then x + MLP(LN2(x))."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str
    layer_norm_eps: float
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x):
        norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                                         param_dtype=jnp.float32, name=name)
        x = x + CLIPAttention(self.hidden_size, self.num_heads, dtype=self.dtype,
                              attention=self.attention, name="self_attn")(norm("layer_norm1")(x))
        return x + CLIPMLP(self.hidden_size, self.intermediate_size, self.hidden_act,
                           dtype=self.dtype, name="mlp")(norm("layer_norm2")(x))


class CLIPEncoder(nn.Module):
    """The stack of layers; returns the input and every layer's output."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str
    layer_norm_eps: float
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x):
        states = [x]
        for i in range(self.num_layers):
            x = CLIPEncoderLayer(self.hidden_size, self.intermediate_size, self.num_heads,
                                 self.hidden_act, self.layer_norm_eps, dtype=self.dtype,
                                 attention=self.attention, name=f"layers_{i}")(x)
            states.append(x)
        return tuple(states)


class CLIPTextTransformer(nn.Module):
    """CLIP's text encoder (Radford et al. 2021, section 2.4), as in transformers' CLIPTextModel.

    ``__call__(input_ids int [batch, length])`` with length <= ``max_positions`` returns a
    :class:`CLIPTextOutput`. There is no padding mask: the causal mask alone keeps the tokens
    up to the end-of-text token from seeing the padding after it, which is how Stable Diffusion
    calls the encoder. The pooled state is read at the end-of-text token: the first position
    holding ``eos_token_id``, or, when ``eos_token_id`` is 2 (the value in configs written
    before transformers fixed it), the position of the largest id, which is the end-of-text
    token of CLIP's vocabulary. ``projection_dim`` adds the bias-free ``text_projection`` of
    CLIPTextModelWithProjection (SDXL's second encoder) and fills ``text_embeds``.
    ``attention`` picks the kernel (see :func:`diffusion_jax.models.layers.dot_product_attention`).
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_positions: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: Optional[int] = None
    eos_token_id: int = 49407
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    def _check(self, input_ids):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} does not split into "
                             f"{self.num_heads} heads")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        if input_ids.shape[1] > self.max_positions:
            raise ValueError(f"{input_ids.shape[1]} tokens exceed the text encoder's "
                             f"{self.max_positions} positions; tokenize with "
                             f"max_length={self.max_positions}")

    @nn.compact
    def __call__(self, input_ids) -> CLIPTextOutput:
        self._check(input_ids)
        x = CLIPTextEmbeddings(self.vocab_size, self.hidden_size, self.max_positions,
                               dtype=self.dtype, name="embeddings")(input_ids)
        hidden_states = CLIPEncoder(self.num_layers, self.hidden_size, self.intermediate_size,
                                    self.num_heads, self.hidden_act, self.layer_norm_eps,
                                    dtype=self.dtype, attention=self.attention,
                                    name="encoder")(x)
        last = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                            param_dtype=jnp.float32, name="final_layer_norm")(hidden_states[-1])
        if self.eos_token_id == 2:
            eos_position = jnp.argmax(input_ids, axis=-1)
        else:
            eos_position = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(last, eos_position[:, None, None], axis=1)[:, 0]
        text_embeds = None
        if self.projection_dim is not None:
            text_embeds = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                                   param_dtype=jnp.float32, name="text_projection")(pooled)
        return CLIPTextOutput(last, hidden_states, pooled, text_embeds)
