"""Diffusion Transformer (Peebles & Xie 2023): patchify, adaLN-Zero blocks, class conditioning.

The image (or latent) is cut into p x p patches, linearly embedded and given fixed 2-D sine-cosine
position embeddings; each block is self-attention and an MLP whose LayerNorms are modulated by
shift, scale and a gate computed from the noise-level (+ class) embedding, all initialised to zero
so every block starts as the identity ("adaLN-Zero", Section 3.2). Sizes S/B/L/XL follow Table 1.

Text conditioning as in PixArt-alpha (Chen et al. 2023): with ``context_dim`` set, each block has a
cross-attention sub-layer to the text tokens between its self-attention and its MLP (here behind
a LayerNorm, with a zero-initialised output projection so it too starts as the identity);
``pooled_dim`` adds a projected pooled text embedding to the noise-level embedding.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.layers import (
    MultiHeadCrossAttention,
    MultiHeadSelfAttention,
    NoiseLevelEmbedding,
    add_class_embedding,
    add_pooled_embedding,
    prepare_context,
)

__all__ = ["DiT", "DiTBlock", "DIT_SIZES", "dit", "sincos_position_embedding", "unpatchify"]

Dtype = Any
_zeros = nn.initializers.zeros

# name: (hidden size, depth, heads), Peebles & Xie 2023, Table 1.
DIT_SIZES = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}


def sincos_position_embedding(dim: int, *sizes: int) -> np.ndarray:
    """Fixed sine-cosine position embedding [prod(sizes), dim] of a grid of tokens.

    ``sincos_position_embedding(dim, height, width)``: half the channels encode the row, half the
    column (as in MAE and DiT); one size (a signal's patches) uses all channels for it; with n
    sizes each axis gets ``2 * (dim // 2n)`` channels (frames, rows and columns of a video) and
    any channels left over are zero. Tokens are in row-major order of the grid."""
    axes = len(sizes)
    if not axes or dim < 2 * axes:
        raise ValueError(f"a position embedding of {axes} axes needs at least {2 * axes} "
                         f"channels, got {dim}")
    per_axis = 2 * (dim // (2 * axes))

    def one_axis(positions, d):
        freqs = 1.0 / 10_000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
        args = positions[:, None] * freqs[None, :]
        return np.concatenate([np.sin(args), np.cos(args)], axis=1)

    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in sizes], indexing="ij")
    parts = [one_axis(grid.reshape(-1), per_axis) for grid in grids]
    emb = np.concatenate(parts + [np.zeros((parts[0].shape[0], dim - axes * per_axis))], axis=1)
    return emb.astype(np.float32)


def unpatchify(tokens, shape, patch):
    """Tokens [batch, n, prod(patch) * channels] back to an input of ``shape`` (channels last).

    The inverse of cutting ``shape``'s spatial axes into patches of size ``patch`` (row-major
    grid of patches, each patch's values row-major then channels)."""
    batch, *spatial, channels = shape
    grid = [size // p for size, p in zip(spatial, patch)]
    out = tokens.reshape(batch, *grid, *patch, channels)
    axes = len(patch)
    # [batch, g1, .., gn, p1, .., pn, c] -> [batch, g1, p1, .., gn, pn, c]
    order = [0] + [i for a in range(axes) for i in (1 + a, 1 + axes + a)] + [1 + 2 * axes]
    return out.transpose(order).reshape(shape)


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nn.Module):
    """DiT's adaLN-Zero transformer block.

    Modulated self-attention, (with ``cross_attention``) LayerNorm -> cross-attention to the
    context, and a modulated MLP; each added to its input. ``mask`` [batch, tokens] leaves absent
    tokens out of the self-attention's keys."""

    hidden: int
    num_heads: int
    mlp_ratio: float = 4.0
    cross_attention: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x, cond, context=None, context_mask=None, mask=None):
        mods = nn.Dense(6 * self.hidden, dtype=self.dtype, kernel_init=_zeros,
                        name="adaln")(nn.silu(cond))
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mods, 6, axis=-1)
        norm = lambda name: nn.LayerNorm(  # noqa: E731
            epsilon=1e-6, use_bias=False, use_scale=False, dtype=self.dtype, name=name)
        h = _modulate(norm("norm_0")(x), shift_a, scale_a)
        x = x + gate_a[:, None, :] * MultiHeadSelfAttention(
            self.num_heads, dtype=self.dtype, attention=self.attention, name="attention")(h, mask)
        if self.cross_attention:
            h = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm_cross")(x)
            x = x + MultiHeadCrossAttention(self.num_heads, dtype=self.dtype,
                                            out_kernel_init=_zeros, attention=self.attention,
                                            name="cross_attention")(h, context, context_mask)
        h = _modulate(norm("norm_1")(x), shift_m, scale_m)
        h = nn.Dense(int(self.hidden * self.mlp_ratio), dtype=self.dtype, name="mlp_0")(h)
        h = nn.Dense(self.hidden, dtype=self.dtype, name="mlp_1")(nn.gelu(h, approximate=True))
        return x + gate_m[:, None, :] * h


class DiT(nn.Module):
    """Diffusion Transformer (Peebles & Xie 2023) on patches of images, signals or videos.

    Inputs are NHWC images, [batch, length, channels] signals (patches of ``patch_size``
    samples) or [batch, frames, height, width, channels] videos (spatio-temporal patches).

    ``DiT(...)(x, noise_level, labels=None, train=False, context=None, context_mask=None,
    pooled=None, residuals=None)``; ``residuals`` are a ControlNet's (see :meth:`__call__`).

    Attributes:
      patch_size, hidden, depth, num_heads: the architecture (see :data:`DIT_SIZES`).
      temporal_patch: frames per patch of a video's spatio-temporal patches
        (``temporal_patch`` x ``patch_size`` x ``patch_size``); unused for images and signals.
      num_classes: enables class conditioning; label ``num_classes`` is the null label.
      out_channels: output channels (default: the input's; DiT's learned-variance models use 2x).
      noise_scale: factor applied to the noise level before the sinusoidal embedding.
      context_dim: width of the text-token embeddings ``context`` [batch, length, context_dim];
        adds a cross-attention sub-layer to every block (``context_mask`` [batch, length], True =
        a real token). ``context=None``, or a row whose mask is all False, means no text: the
        cross-attention sub-layers then add exactly zero. None: no cross-attention parameters.
      pooled_dim: width of a pooled text embedding ``pooled`` [batch, pooled_dim], added to the
        noise-level embedding through a Dense layer (``pooled=None`` counts as zeros).
      remat: recompute each block in the backward pass (``nn.remat``); same parameters and
        results, less activation memory.
      attention: the attention kernel, "xla", "cudnn" or "auto" (see
        :func:`~diffusion_jax.models.layers.dot_product_attention`); same parameters.
      dropout: dropout on the attention and MLP outputs is not used by DiT; kept at 0.
    """

    patch_size: int = 2
    temporal_patch: int = 1
    hidden: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: Optional[int] = None
    out_channels: Optional[int] = None
    noise_scale: float = 1000.0
    context_dim: Optional[int] = None
    pooled_dim: Optional[int] = None
    remat: bool = False
    attention: str = "xla"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, noise_level, labels=None, train: bool = False, context=None,
                 context_mask=None, pooled=None, residuals=None):
        """The denoiser's output for ``x`` at ``noise_level``.

        ``residuals`` (from :class:`~diffusion_jax.models.controlnet.DiTControlNet` s) is None
        or one array of tokens per block of the ControlNet's copy, each added to the output of
        the block of the same index (PixArt's ControlNet-Transformer, Chen et al. 2024)."""
        del train  # no dropout in DiT
        tokens, cond, context, context_mask = self.embed(x, noise_level, labels, context,
                                                         context_mask, pooled)
        residuals = list(residuals or [])
        if len(residuals) > self.depth:
            raise ValueError(f"{len(residuals)} ControlNet residuals for the {self.depth} blocks "
                             "of this DiT: the ControlNet was built for another DiT")
        for i in range(self.depth):
            tokens = self.block(i)(tokens, cond, context, context_mask)
            if i < len(residuals):
                if residuals[i].shape != tokens.shape:
                    raise ValueError(f"a ControlNet residual of shape {residuals[i].shape} meets "
                                     f"tokens of shape {tokens.shape}: the ControlNet was "
                                     "built for another DiT")
                tokens = tokens + residuals[i].astype(tokens.dtype)
        return self.head(tokens, cond, x.shape)

    # The network in three parts, which a ControlNet (a copy of the embedding and the first
    # blocks) shares: called from a compact method, each creates its layers under the caller's
    # names.

    def patch_shape(self, x_shape) -> tuple:
        """The patch's size along each spatial axis of inputs of ``x_shape``.

        ``patch_size`` along every axis of an image or signal; a video's frames are patched
        ``temporal_patch`` at a time."""
        spatial = len(x_shape) - 2
        if spatial == 3:
            return (self.temporal_patch,) + (self.patch_size,) * 2
        return (self.patch_size,) * spatial

    def embed(self, x, noise_level, labels, context, context_mask, pooled):
        """``(tokens, cond, context, context_mask)``: patches with positions, the conditioning."""
        if x.ndim not in (3, 4, 5):
            raise ValueError("DiT expects NHWC images [batch, height, width, channels], signals "
                             "[batch, length, channels] or videos [batch, frames, height, width, "
                             f"channels], got {x.shape}")
        batch = x.shape[0]
        patch = self.patch_shape(x.shape)
        if any(size % p for size, p in zip(x.shape[1:-1], patch)):
            raise ValueError(f"input size {x.shape[1:-1]} is not divisible by patch size "
                             f"{patch if len(patch) == 3 else self.patch_size}")
        grid = tuple(size // p for size, p in zip(x.shape[1:-1], patch))
        tokens = nn.Conv(self.hidden, patch, strides=patch, padding="VALID", dtype=self.dtype,
                         name="patch_embedding")(x.astype(self.dtype))
        tokens = tokens.reshape(batch, -1, self.hidden)
        tokens = tokens + jnp.asarray(sincos_position_embedding(self.hidden, *grid),
                                      self.dtype)[None]

        noise_level = jnp.broadcast_to(noise_level, (batch,))
        cond = NoiseLevelEmbedding(self.hidden, 256, self.noise_scale, dtype=self.dtype,
                                   name="noise_embedding")(noise_level)
        cond = add_class_embedding(cond, labels, self.num_classes, self.dtype, "DiT")
        cond = add_pooled_embedding(cond, pooled, self.pooled_dim, self.dtype, "DiT")
        context, context_mask = prepare_context(context, context_mask, self.context_dim, batch,
                                                self.dtype, "DiT")
        return tokens, cond, context, context_mask

    def block(self, i):
        """Transformer block ``i`` (``block_{i}``)."""
        # nn.remat keeps the block names: the parameter tree is the same with remat on or off.
        block_class = nn.remat(DiTBlock) if self.remat else DiTBlock
        return block_class(self.hidden, self.num_heads, self.mlp_ratio,
                           cross_attention=self.context_dim is not None, dtype=self.dtype,
                           attention=self.attention, name=f"block_{i}")

    def head(self, tokens, cond, x_shape):
        """The final adaLN and linear layer, tokens back to an input of ``x_shape`` (float32)."""
        patch = self.patch_shape(x_shape)
        out_channels = self.out_channels or x_shape[-1]
        shift, scale = jnp.split(
            nn.Dense(2 * self.hidden, dtype=self.dtype, kernel_init=_zeros,
                     name="final_adaln")(nn.silu(cond)), 2, axis=-1)
        tokens = _modulate(nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False,
                                        dtype=self.dtype, name="final_norm")(tokens), shift, scale)
        tokens = nn.Dense(int(np.prod(patch)) * out_channels, dtype=self.dtype,
                          kernel_init=_zeros, name="final_linear")(tokens)
        return unpatchify(tokens, x_shape[:-1] + (out_channels,), patch).astype(jnp.float32)


def dit(size: str, patch_size: int = 2, **kwargs) -> DiT:
    """``dit("B", 2, num_classes=10)`` builds DiT-B/2."""
    if size not in DIT_SIZES:
        raise ValueError(f"unknown DiT size {size!r}; choose one of {sorted(DIT_SIZES)}")
    hidden, depth, heads = DIT_SIZES[size]
    return DiT(patch_size=patch_size, hidden=hidden, depth=depth, num_heads=heads, **kwargs)
