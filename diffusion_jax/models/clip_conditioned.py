"""A Stable Diffusion denoiser with its CLIP text encoder, as one module for the training loop.

The counterpart of :class:`~diffusion_jax.models.text_conditioned.TextConditioned` for a UNet and
a text encoder loaded from a diffusers folder: the same call signature, so the loop, the losses
and the samplers treat both alike, and the parameters ``{"encoder": ..., "denoiser": ...}``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.clip_text import CLIPTextTransformer

__all__ = ["CLIPConditioned"]


class CLIPConditioned(nn.Module):
    """A Stable Diffusion UNet reading the last hidden states of its CLIP text encoder.

    ``CLIPConditioned(denoiser, encoder, null_tokens)(x, noise_level, labels=None,
    train=False, tokens=None, token_mask=None)``: ``tokens`` are CLIP ids [batch, length] (from the folder's tokenizer); ``None`` means the
    empty prompt, whose ids ``null_tokens`` holds. The denoiser cross-attends to the encoder's
    last hidden states over every position, as Stable Diffusion 1.x and 2.x do (``token_mask``
    is accepted for the loop's sake and not used: those UNets never mask the padding).
    ``freeze_text`` stops gradients at the encoder's output."""

    denoiser: nn.Module
    encoder: CLIPTextTransformer
    null_tokens: Sequence[int]
    freeze_text: bool = False

    @nn.compact
    def __call__(self, x, noise_level, labels=None, train: bool = False, tokens=None,
                 token_mask=None, **control):
        del token_mask
        if labels is not None:
            raise ValueError("a Stable Diffusion UNet takes no class labels")
        if tokens is None:
            tokens = jnp.broadcast_to(jnp.asarray(self.null_tokens, jnp.int32),
                                      (x.shape[0], len(self.null_tokens)))
        context = self.encoder(tokens).last_hidden_state
        if self.freeze_text:
            context = jax.lax.stop_gradient(context)
        # control / control_scale reach a ControlledUNet denoiser (see models.controlnet).
        return self.denoiser(x, noise_level, train=train, context=context, **control)
