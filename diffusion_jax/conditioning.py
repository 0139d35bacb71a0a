"""Conditioning: how labels and captions reach a denoiser, in training and in generation.

Training drops labels and captions at random (classifier-free guidance's unconditional branch)
and calls the network with dropout; generation calls it with labels, caption tokens or
precomputed text embeddings.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from diffusion_jax import text as text_lib

__all__ = ["TEXT_KEYS", "CONTROL_KEYS", "SET_KEYS", "drop_labels", "drop_captions",
           "network_apply_fn", "sampling_network"]

# Condition entries handed to the network as keyword arguments: caption tokens (for
# TextConditioned), or precomputed text embeddings (e.g. from a frozen external encoder) for a
# UNet/DiT built with context_dim.
TEXT_KEYS = ("tokens", "token_mask", "context", "context_mask", "pooled")
# A ControlNet run's control images [batch, H, W, C] in [0, 1] and, in generation, their
# conditioning scales [batch, ControlNets] (see diffusion_jax.models.controlnet.ControlledUNet).
CONTROL_KEYS = ("control", "control_scale")
# The present members [batch, members] of sets of varying size (the atoms of molecules), for
# the set denoisers (diffusion_jax.models.egnn).
SET_KEYS = ("node_mask",)
_KEYWORD_KEYS = TEXT_KEYS + CONTROL_KEYS + SET_KEYS


def drop_labels(num_classes: int, label_dropout: float, label_key: str = "label"):
    """A loss ``prepare(batch, key) -> batch`` that drops labels for classifier-free guidance.

    Each label is replaced by the null label ``num_classes`` with probability
    ``label_dropout``, which teaches the same network the unconditional denoiser that
    classifier-free guidance needs (Ho & Salimans 2021). The draw uses the global batch's shape,
    so every way of splitting the batch drops the same labels.
    """

    def prepare(batch, key):
        if label_key not in batch:
            return batch
        labels = batch[label_key]
        drop = jax.random.bernoulli(key, label_dropout, labels.shape)
        return {**batch, label_key: jnp.where(drop, num_classes, labels)}

    return prepare


def drop_captions(caption_dropout: float, max_length: int, null=None):
    """A loss ``prepare(batch, key) -> batch`` that drops captions for classifier-free guidance.

    Each caption is replaced by the empty caption with probability ``caption_dropout`` (the
    unconditional branch), drawn for the whole global batch. ``null`` is the empty caption's
    ``(tokens, mask)`` ([1, length] each) from the run's tokenizer; by default the byte-level
    one of :func:`diffusion_jax.text.null_text`.
    """
    null = text_lib.null_text(max_length) if null is None else null
    null_tokens, null_mask = (jnp.asarray(a[0]) for a in null)

    def prepare(batch, key):
        if "tokens" not in batch:
            return batch
        tokens, mask = batch["tokens"], batch["token_mask"]
        drop = jax.random.bernoulli(key, caption_dropout, tokens.shape[:1])[:, None]
        return {**batch, "tokens": jnp.where(drop, null_tokens[:tokens.shape[1]], tokens),
                "token_mask": jnp.where(drop, null_mask[:tokens.shape[1]], mask)}

    return prepare


def network_apply_fn(model, *, num_classes: Optional[int] = None, label_dropout: float = 0.0,
                     label_key: str = "label", dropout_rng: str = "threefry"):
    """Adapt a Flax denoiser to the loss's ``apply_fn(params, x_in, noise_input, cond, key)``.

    With ``label_dropout``, labels are also dropped here (see :func:`drop_labels`; the config
    path drops them in the loss's ``prepare`` stage instead, before the batch is split).
    ``dropout_rng="rbg"`` draws the dropout masks with XLA's RngBitGenerator, seeded from the
    step's key (cheaper on accelerators; the masks then depend on how the batch is laid out).
    """
    if label_dropout and num_classes is None:
        raise ValueError("label_dropout needs num_classes (the null label's index)")
    if dropout_rng not in ("threefry", "rbg"):
        raise ValueError(f"dropout_rng must be 'threefry' or 'rbg', got {dropout_rng!r}")

    def apply_fn(params, x_in, noise_input, cond, key):
        key_drop, key_labels = jax.random.split(key)
        if dropout_rng == "rbg":
            key_drop = jax.random.wrap_key_data(
                jax.random.bits(key_drop, (4,), jnp.uint32), impl="rbg")
        if num_classes is not None and label_dropout:
            cond = drop_labels(num_classes, label_dropout, label_key)(cond, key_labels)
        labels = cond.get(label_key) if num_classes is not None else None
        text = {k: cond[k] for k in _KEYWORD_KEYS if k in cond}
        return model.apply({"params": params}, x_in, noise_input, labels, train=True,
                           rngs={"dropout": key_drop}, **text)

    return apply_fn


@functools.lru_cache(maxsize=None)
def sampling_network(model):
    """``network(params, x, noise_level, cond)``: ``model`` applied for generation.

    ``cond`` is None, an array of labels, or a dict with ``label`` and/or the text entries of
    :data:`TEXT_KEYS`, the control entries of :data:`CONTROL_KEYS` and the set entries of
    :data:`SET_KEYS`. One function per model,
    so that compiled samplers are reused.
    """

    def apply(params, x, noise_level, cond):
        if isinstance(cond, dict):  # {"label": ...} and/or text {"tokens", "token_mask"}
            text = {k: cond[k] for k in _KEYWORD_KEYS if k in cond}
            return model.apply({"params": params}, x, noise_level, cond.get("label"), **text)
        return model.apply({"params": params}, x, noise_level, cond)

    return apply
