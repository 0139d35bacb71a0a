"""A denoiser conditioned on text through a byte-level text encoder trained with it.

The denoiser cross-attends to the encoder's token embeddings, and the pooled embedding joins the
noise-level embedding."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax import text as text_lib
from diffusion_jax.models.text_encoder import TextEncoder

__all__ = ["TextConditioned"]


class TextConditioned(nn.Module):
    """A denoiser and the text encoder whose embeddings condition it, as one module.

    ``TextConditioned(denoiser, encoder)(x, noise_level, labels=None, train=False, tokens=None,
    token_mask=None)``.

    ``tokens``/``token_mask`` ([batch, length], from :func:`diffusion_jax.text.encode`) are the
    captions; ``None`` means the empty caption, the unconditional input of classifier-free
    guidance. The denoiser must be built with ``context_dim`` and ``pooled_dim`` equal to the
    encoder's width. ``freeze_text`` stops gradients at the encoder's outputs (for an encoder
    taken from an earlier run; a frozen randomly initialised encoder still gives the denoiser a
    fixed, informative embedding of the bytes). Parameters: ``{"encoder": ..., "denoiser":
    ...}``. Other keyword arguments (``control``, ``control_scale`` of a
    :class:`~diffusion_jax.models.controlnet.ControlledUNet`) go to the denoiser.
    """

    denoiser: nn.Module
    encoder: TextEncoder
    freeze_text: bool = False

    @nn.compact
    def __call__(self, x, noise_level, labels=None, train: bool = False, tokens=None,
                 token_mask=None, **control):
        if (tokens is None) != (token_mask is None):
            raise ValueError("give both tokens and token_mask (from diffusion_jax.text.encode), "
                             "or neither for the empty caption")
        if tokens is None:
            null_tokens, null_mask = text_lib.null_text(self.encoder.max_length)
            tokens = jnp.broadcast_to(jnp.asarray(null_tokens), (x.shape[0],) +
                                      null_tokens.shape[1:])
            token_mask = jnp.broadcast_to(jnp.asarray(null_mask), tokens.shape)
        context, pooled = self.encoder(tokens, token_mask)
        if self.freeze_text:
            context, pooled = jax.lax.stop_gradient((context, pooled))
        return self.denoiser(
            x, noise_level, labels, train=train, context=context, context_mask=token_mask,
            pooled=pooled, **control)
