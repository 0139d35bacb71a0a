"""A UNet denoiser in the DDPM / ADM style (Ho et al. 2020; Dhariwal & Nichol 2021).

Residual blocks with GroupNorm and SiLU, the noise-level embedding added per block (or applied as
a scale and shift, ADM's "AdaGN"), self-attention at chosen resolutions, strided-convolution
downsampling and nearest-neighbour upsampling, dropout, and optional class conditioning with a null
label for classifier-free guidance. Layout NHWC; parameters float32; computation in ``dtype``.

With ``channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,)``
on 32x32x3 images it is DDPM's CIFAR-10 network, 35,746,307 parameters.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import (
    MultiHeadSelfAttention,
    NoiseLevelEmbedding,
    add_class_embedding,
)

__all__ = ["UNet", "ResBlock", "AttentionBlock"]

Dtype = Any
_zeros = nn.initializers.zeros


class ResBlock(nn.Module):
    """GN -> SiLU -> conv -> (+ embedding, or scale/shift) -> GN -> SiLU -> dropout -> conv, plus a
    1x1 projection of the input when the channel count changes."""

    features: int
    dropout: float = 0.0
    scale_shift: bool = False
    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb, train: bool):
        h = nn.silu(nn.GroupNorm(self.num_groups, dtype=self.dtype, name="norm_0")(x))
        h = nn.Conv(self.features, (3, 3), dtype=self.dtype, name="conv_0")(h)
        emb_out = nn.Dense(
            2 * self.features if self.scale_shift else self.features, dtype=self.dtype,
            name="emb",
        )(nn.silu(emb))[:, None, None, :]
        h_norm = nn.GroupNorm(self.num_groups, dtype=self.dtype, name="norm_1")
        if self.scale_shift:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = h_norm(h) * (1 + scale) + shift
        else:
            h = h_norm(h + emb_out)
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
        # Zero-initialised so that every block starts as the identity (Ho et al. 2020).
        h = nn.Conv(self.features, (3, 3), dtype=self.dtype, kernel_init=_zeros, name="conv_1")(h)
        if x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), dtype=self.dtype, name="skip")(x)
        return x + h


class AttentionBlock(nn.Module):
    """GroupNorm, multi-head self-attention over all pixels, residual connection."""

    num_heads: int = 1
    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, height, width, channels = x.shape
        h = nn.GroupNorm(self.num_groups, dtype=self.dtype, name="norm")(x)
        h = h.reshape(batch, height * width, channels)
        h = MultiHeadSelfAttention(self.num_heads, dtype=self.dtype, out_kernel_init=_zeros,
                                   name="attention")(h)
        return x + h.reshape(batch, height, width, channels)


class UNet(nn.Module):
    """``UNet(...)(x, noise_level, labels=None, train=False) -> output`` with the shape of x
    (or ``out_channels`` channels).

    Attributes:
      channels: base width; level i has ``channels * channel_mult[i]`` channels.
      attention_resolutions: feature-map sizes (height) with self-attention after each res block.
      num_classes: enables class conditioning; label ``num_classes`` is the null label used for
        classifier-free guidance (``labels=None`` means all null).
      noise_scale: factor applied to the noise level before the sinusoidal embedding.
      scale_shift: ADM-style scale and shift from the embedding instead of addition.
      dtype: computation dtype (parameters stay float32).
    """

    channels: int = 128
    channel_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (16,)
    num_heads: int = 1
    dropout: float = 0.1
    num_classes: Optional[int] = None
    out_channels: Optional[int] = None
    noise_scale: float = 1000.0
    scale_shift: bool = False
    num_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, noise_level, labels=None, train: bool = False):
        if x.ndim != 4:
            raise ValueError(f"UNet expects NHWC images [batch, height, width, channels], got {x.shape}")
        levels = len(self.channel_mult)
        if x.shape[1] % 2 ** (levels - 1) or x.shape[2] % 2 ** (levels - 1):
            raise ValueError(
                f"image size {x.shape[1:3]} must be divisible by {2 ** (levels - 1)} for "
                f"{levels} resolution levels"
            )
        emb_dim = 4 * self.channels
        noise_level = jnp.broadcast_to(noise_level, x.shape[:1])
        emb = NoiseLevelEmbedding(emb_dim, self.channels, self.noise_scale, dtype=self.dtype,
                                  name="noise_embedding")(noise_level)
        emb = add_class_embedding(emb, labels, self.num_classes, self.dtype, "UNet")

        res_block = lambda features, name: ResBlock(  # noqa: E731
            features, self.dropout, self.scale_shift, self.num_groups, self.dtype, name=name)
        attention = lambda name: AttentionBlock(  # noqa: E731
            self.num_heads, self.num_groups, self.dtype, name=name)

        h = nn.Conv(self.channels, (3, 3), dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
        skips = [h]
        for level, mult in enumerate(self.channel_mult):
            for block in range(self.num_res_blocks):
                h = res_block(self.channels * mult, f"down_{level}_res_{block}")(h, emb, train)
                if h.shape[1] in self.attention_resolutions:
                    h = attention(f"down_{level}_attn_{block}")(h)
                skips.append(h)
            if level != levels - 1:
                h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                            dtype=self.dtype, name=f"down_{level}_downsample")(h)
                skips.append(h)

        h = res_block(h.shape[-1], "mid_res_0")(h, emb, train)
        h = attention("mid_attn")(h)
        h = res_block(h.shape[-1], "mid_res_1")(h, emb, train)

        for level in reversed(range(levels)):
            for block in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res_block(self.channels * self.channel_mult[level],
                              f"up_{level}_res_{block}")(h, emb, train)
                if h.shape[1] in self.attention_resolutions:
                    h = attention(f"up_{level}_attn_{block}")(h)
            if level != 0:
                batch, height, width, channels = h.shape
                h = jax.image.resize(h, (batch, 2 * height, 2 * width, channels), "nearest")
                h = nn.Conv(channels, (3, 3), dtype=self.dtype, name=f"up_{level}_upsample")(h)

        h = nn.silu(nn.GroupNorm(self.num_groups, dtype=self.dtype, name="norm_out")(h))
        out = nn.Conv(self.out_channels or x.shape[-1], (3, 3), dtype=self.dtype,
                      kernel_init=_zeros, name="conv_out")(h)
        return out.astype(jnp.float32)
