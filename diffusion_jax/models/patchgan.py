"""The PatchGAN discriminator that sharpens an autoencoder's reconstructions.

Isola et al. 2017 (pix2pix), as Esser et al. 2021 (taming transformers) and Rombach et al. 2022
use it for the first stage of latent diffusion: a stack of 4x4 convolutions whose output is one
real/fake logit per overlapping image patch rather than one per image.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

__all__ = ["PatchDiscriminator"]


def _groups(channels: int) -> int:
    """The largest group count up to 32 that divides ``channels``."""
    return next(g for g in range(min(32, channels), 0, -1) if channels % g == 0)


class PatchDiscriminator(nn.Module):
    """Logits ``[batch, h, w, 1]`` of "this patch is real" for NHWC images in [-1, 1].

    ``layers`` stride-2 convolutions (widths ``channels * min(2**n, 8)``), one stride-1
    convolution and a 1-channel output convolution, all 4x4 with LeakyReLU(0.2) between them.
    The published network normalises with BatchNorm; this one uses GroupNorm, which keeps no
    batch statistics, so the train step stays a pure function whose result does not depend on
    how the batch is split over devices.
    """

    layers: int = 3
    channels: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images):
        init = nn.initializers.normal(0.02)
        conv = lambda width, stride, bias: nn.Conv(  # noqa: E731
            width, (4, 4), strides=stride, padding=1, use_bias=bias, kernel_init=init,
            dtype=self.dtype)
        h = nn.leaky_relu(conv(self.channels, 2, True)(images.astype(self.dtype)), 0.2)
        for n in range(1, self.layers + 1):
            width = self.channels * min(2 ** n, 8)
            h = conv(width, 2 if n < self.layers else 1, False)(h)
            h = nn.GroupNorm(_groups(width), dtype=self.dtype)(h)
            h = nn.leaky_relu(h, 0.2)
        return conv(1, 1, True)(h).astype(jnp.float32)
