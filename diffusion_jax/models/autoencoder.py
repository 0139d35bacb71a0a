"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022), in Flax linen.

A re-implementation of diffusers' ``AutoencoderKL`` (the Stable Diffusion VAE) that computes the
same function from the same weights: ``diffusion_jax.pretrained.autoencoder_kl`` converts a
diffusers state dict onto its parameter tree. Images are NHWC, parameters float32, and ``dtype``
is the computation dtype.

The encoder maps an image to the mean and log-variance of a diagonal Gaussian over latents
``2 ** (levels - 1)`` times smaller in each spatial direction; the decoder maps a latent back to
an image. Submodule names follow diffusers' state dict (``down_blocks_0/resnets_1/conv1`` for
``down_blocks.0.resnets.1.conv1``), so the conversion is a renaming plus layout transposes.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import upsample_nearest

__all__ = ["AutoencoderKL", "sample_latent", "kl_divergence", "LOGVAR_MIN", "LOGVAR_MAX"]

# The clip diffusers' DiagonalGaussianDistribution applies to the encoder's log-variance.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
# Every normalisation of the autoencoder uses this epsilon (diffusers' resnet_eps).
NORM_EPSILON = 1e-6


def sample_latent(mean, logvar, key):
    """A draw ``z = mean + exp(logvar / 2) * eps`` with ``eps ~ N(0, I)`` from ``key``.

    The reparameterisation of Kingma & Welling 2014 (section 2.4); float32 noise, the result in
    the promoted dtype of ``mean`` and float32."""
    noise = jax.random.normal(key, mean.shape, jnp.float32)
    return mean + jnp.exp(0.5 * logvar) * noise


def kl_divergence(mean, logvar):
    """KL divergence of N(mean, exp(logvar)) from N(0, I), per example, shape [batch].

    The closed form of Kingma & Welling 2014 (appendix B),
    ``KL = 1/2 * sum(mean^2 + exp(logvar) - 1 - logvar)``, in nats, summed over every latent
    element of an example (all axes but the first) and not averaged: the convention of diffusers'
    ``DiagonalGaussianDistribution.kl()`` and of the latent-diffusion training code, whose loss
    then divides the sum over the batch by the batch size."""
    mean = jnp.asarray(mean, jnp.float32)
    logvar = jnp.asarray(logvar, jnp.float32)
    per_element = jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar
    return 0.5 * jnp.sum(per_element.reshape(per_element.shape[0], -1), axis=-1)


def _group_norm(num_groups: int, dtype: Any, name: str) -> nn.GroupNorm:
    # Two-pass variance: the decoder's activations reach large magnitudes, where E[x^2] - E[x]^2
    # loses precision in float32.
    return nn.GroupNorm(num_groups=num_groups, epsilon=NORM_EPSILON, use_fast_variance=False,
                        dtype=dtype, name=name)


def _conv3x3(features: int, dtype: Any, name: str) -> nn.Conv:
    return nn.Conv(features, (3, 3), padding=1, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    """A residual block without time embedding: (GroupNorm, SiLU, 3x3 conv) twice, plus the input.

    A 1x1 convolution ``conv_shortcut`` projects the input when the channel count changes. Dropout
    is diffusers' 0 and the output scale factor its 1, so neither appears."""

    out_channels: int
    num_groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.silu(_group_norm(self.num_groups, self.dtype, "norm1")(x))
        h = _conv3x3(self.out_channels, self.dtype, "conv1")(h)
        h = nn.silu(_group_norm(self.num_groups, self.dtype, "norm2")(h))
        h = _conv3x3(self.out_channels, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        return x + h


class Downsample(nn.Module):
    """Halves the resolution: pad one zero row and column at the bottom and right, 3x3 conv, stride 2."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.Conv(self.channels, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)),
                       dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
    """Doubles the resolution: nearest-neighbour 2x upsampling, then a 3x3 convolution."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _conv3x3(self.channels, self.dtype, "conv")(upsample_nearest(x, 2))


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the spatial positions of NHWC ``x``, added to ``x``.

    GroupNorm, then query, key and value projections of the full width (one head of
    ``channels`` dimensions, logits scaled by ``channels ** -0.5``, softmax in float32), an output
    projection ``to_out_0``, and the residual connection; the rescale factor is diffusers' 1."""

    num_groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, height, width, channels = x.shape
        h = _group_norm(self.num_groups, self.dtype, "group_norm")(x)
        tokens = h.reshape(batch, height * width, 1, channels)
        query, key, value = (nn.Dense(channels, dtype=self.dtype, name=name)(tokens)
                             for name in ("to_q", "to_k", "to_v"))
        out = jax.nn.dot_product_attention(query, key, value)
        out = nn.Dense(channels, dtype=self.dtype, name="to_out_0")(out)
        return x + out.reshape(batch, height, width, channels)


class MidBlock(nn.Module):
    """The bottleneck: a resnet block, the spatial self-attention (optional), a resnet block."""

    num_groups: int
    attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        x = ResnetBlock(channels, self.num_groups, self.dtype, name="resnets_0")(x)
        if self.attention:
            x = SpatialSelfAttention(self.num_groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock(channels, self.num_groups, self.dtype, name="resnets_1")(x)


class EncoderLevel(nn.Module):
    """One level of the encoder (diffusers' DownEncoderBlock2D): resnet blocks, then a downsampler."""

    channels: int
    num_layers: int
    num_groups: int
    downsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for layer in range(self.num_layers):
            x = ResnetBlock(self.channels, self.num_groups, self.dtype, name=f"resnets_{layer}")(x)
        if self.downsample:
            x = Downsample(self.channels, self.dtype, name="downsamplers_0")(x)
        return x


class DecoderLevel(nn.Module):
    """One level of the decoder (diffusers' UpDecoderBlock2D): resnet blocks, then an upsampler."""

    channels: int
    num_layers: int
    num_groups: int
    upsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for layer in range(self.num_layers):
            x = ResnetBlock(self.channels, self.num_groups, self.dtype, name=f"resnets_{layer}")(x)
        if self.upsample:
            x = Upsample(self.channels, self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Image -> ``2 * latent_channels`` moments (before the quantisation conv), NHWC.

    conv_in; per level ``layers_per_block`` resnet blocks of that level's width and, except at
    the last level, a downsampler; the mid block; GroupNorm, SiLU and conv_out."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    latent_channels: int
    num_groups: int
    mid_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        widths, groups, dtype = tuple(self.block_out_channels), self.num_groups, self.dtype
        h = _conv3x3(widths[0], dtype, "conv_in")(x)
        for level, width in enumerate(widths):
            h = EncoderLevel(width, self.layers_per_block, groups, level < len(widths) - 1,
                             dtype, name=f"down_blocks_{level}")(h)
        h = MidBlock(groups, self.mid_attention, dtype, name="mid_block")(h)
        h = nn.silu(_group_norm(groups, dtype, "conv_norm_out")(h))
        return _conv3x3(2 * self.latent_channels, dtype, "conv_out")(h)


class Decoder(nn.Module):
    """Latent -> image, NHWC (after the post-quantisation conv).

    conv_in to the last width; the mid block; per level in reversed widths
    ``layers_per_block + 1`` resnet blocks and, except at the last level, an upsampler;
    GroupNorm and SiLU (where ``hidden_only=True`` stops) and conv_out."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    out_channels: int
    num_groups: int
    mid_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z, hidden_only: bool = False):
        widths, groups, dtype = tuple(reversed(self.block_out_channels)), self.num_groups, self.dtype
        h = _conv3x3(widths[0], dtype, "conv_in")(z)
        h = MidBlock(groups, self.mid_attention, dtype, name="mid_block")(h)
        for level, width in enumerate(widths):
            h = DecoderLevel(width, self.layers_per_block + 1, groups, level < len(widths) - 1,
                             dtype, name=f"up_blocks_{level}")(h)
        h = nn.silu(_group_norm(groups, dtype, "conv_norm_out")(h))
        if hidden_only:
            return h
        # Exactly nn.Conv(out_channels, (3, 3), padding=1) when dtype is float32: the adaptive
        # GAN weight is computed through this layer's parameters alone.
        return _conv3x3(self.out_channels, dtype, "conv_out")(h)


class AutoencoderKL(nn.Module):
    """The latent-diffusion VAE of Rombach et al. 2022: images <-> Gaussian posteriors over latents.

    The same architecture and parameters as diffusers' ``AutoencoderKL``; the fields are its
    config's (``mid_attention`` is ``mid_block_add_attention``). ``block_out_channels`` gives the
    width of each level; the latents are ``downsampling_factor = 2 ** (levels - 1)`` times smaller
    than the images in height and width.

    Methods (``model.apply({"params": params}, x, method=...)``): ``encode(x) -> (mean,
    logvar)``, ``decode(z) -> x``, ``decode_hidden(z)`` (the decoder's features before its last
    convolution, ``params["decoder"]["conv_out"]``), and ``__call__(x, key=None) ->
    (reconstruction, mean, logvar)``. Images are NHWC in [-1, 1]; the latents are unscaled (a
    latent diffusion model multiplies them by the checkpoint's ``scaling_factor``). Means,
    log-variances and images come out in float32 whatever the computation dtype;
    ``decode_hidden`` returns the computation dtype."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    dtype: Any = jnp.float32

    def setup(self):
        for width in self.block_out_channels:
            if width % self.norm_num_groups:
                raise ValueError(f"block_out_channels {tuple(self.block_out_channels)}: width "
                                 f"{width} does not split into norm_num_groups="
                                 f"{self.norm_num_groups} groups")
        common = dict(block_out_channels=tuple(self.block_out_channels),
                      layers_per_block=self.layers_per_block, num_groups=self.norm_num_groups,
                      mid_attention=self.mid_attention, dtype=self.dtype)
        self.encoder = Encoder(latent_channels=self.latent_channels, **common)
        self.decoder = Decoder(out_channels=self.out_channels, **common)
        if self.use_quant_conv:
            self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1), dtype=self.dtype)
        if self.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), dtype=self.dtype)

    @property
    def downsampling_factor(self) -> int:
        """How many image pixels one latent spans in height and in width."""
        return 2 ** (len(self.block_out_channels) - 1)

    def _check_input(self, x, channels: int, what: str):
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"AutoencoderKL.{what} expects NHWC inputs with {channels} channels, "
                             f"got shape {x.shape}")

    def encode(self, x):
        """Images [batch, H, W, in_channels] -> (mean, logvar) of the posterior, float32.

        H and W divisible by ``downsampling_factor`` give latents [batch, H / f, W / f,
        latent_channels]. The log-variance is clipped to [-30, 20] as in diffusers."""
        self._check_input(x, self.in_channels, "encode")
        moments = self.encoder(x.astype(self.dtype))
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def _decoder_input(self, z):
        self._check_input(z, self.latent_channels, "decode")
        z = z.astype(self.dtype)
        return self.post_quant_conv(z) if self.use_post_quant_conv else z

    def decode(self, z):
        """Latents [batch, h, w, latent_channels] -> images [batch, h f, w f, out_channels], float32."""
        return self.decoder(self._decoder_input(z)).astype(jnp.float32)

    def decode_hidden(self, z):
        """The decoder's last features (after its final GroupNorm and SiLU), before conv_out.

        ``nn.Conv(out_channels, (3, 3), padding=1).apply({"params":
        params["decoder"]["conv_out"]}, decode_hidden(z))`` equals ``decode(z)`` (float32)."""
        return self.decoder(self._decoder_input(z), hidden_only=True)

    def __call__(self, x, key=None):
        """Encodes and decodes: (reconstruction, mean, logvar).

        The decoded latent is a posterior draw (:func:`sample_latent`) when ``key`` is given and
        the posterior mean otherwise."""
        mean, logvar = self.encode(x)
        z = mean if key is None else sample_latent(mean, logvar, key)
        return self.decode(z), mean, logvar
