"""A factorised space-time UNet for video (Ho et al. 2022, Video Diffusion Models).

The image UNet of :mod:`diffusion_jax.models.unet`, applied to every frame of [batch, frames,
height, width, channels] clips, with the frames mixed in between: each residual block's 3x3
convolutions act on one frame at a time (1x3x3 kernels) and are followed by a 3-tap convolution
across frames; each spatial attention block (self-attention over one frame's pixels, or a
transformer block that also cross-attends to the text) is followed by self-attention across
frames at each pixel, with a sine-cosine embedding of the frame index so that it knows the order.
Downsampling and upsampling halve and double height and width only; the frame count stays.
By default every temporal layer's output projection starts at zero, so a new VideoUNet computes
exactly the image UNet frame by frame, which is how an image model's weights can start a video
model ("inflation"); ``temporal_init="default"`` gives them the usual random initialisation
instead, for a model trained from scratch.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models.layers import FrameConv, GroupNorm, MultiHeadSelfAttention
from diffusion_jax.models.layers import upsample_nearest
from diffusion_jax.models.dit import sincos_position_embedding
from diffusion_jax.models.unet import AttentionBlock, ResBlock, SpatialTransformer, UNet

__all__ = ["VideoUNet", "TemporalConv", "TemporalAttention", "TEMPORAL_INITS"]

_zeros = nn.initializers.zeros
TEMPORAL_INITS = ("zeros", "default")  # VideoUNet.temporal_init's values


class TemporalConv(nn.Module):
    """GroupNorm -> SiLU -> 3-tap convolution across frames, added to the input.

    The convolution's kernel starts at zero (the layer is the identity) unless not
    ``zero_init``."""

    num_groups: int = 32
    dtype: object = jnp.float32
    zero_init: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.silu(GroupNorm(self.num_groups, dtype=self.dtype, name="norm")(x, train))
        kwargs = {"kernel_init": _zeros} if self.zero_init else {}
        h = nn.Conv(x.shape[-1], (3, 1, 1), dtype=self.dtype, name="conv", **kwargs)(h)
        return x + h


class TemporalAttention(nn.Module):
    """Self-attention across the frames of each pixel, with frame positions; starts as the identity.

    GroupNorm, plus a fixed sine-cosine embedding of the frame index, then multi-head attention
    over the frames of [batch, frames, height, width, channels] at every (row, column), its output
    projection zero-initialised (unless not ``zero_init``) and added to the input."""

    num_heads: int = 1
    num_groups: int = 32
    dtype: object = jnp.float32
    attention: str = "xla"
    zero_init: bool = True

    @nn.compact
    def __call__(self, x):
        batch, frames, height, width, channels = x.shape
        h = GroupNorm(self.num_groups, dtype=self.dtype, name="norm")(x)
        h = h.transpose(0, 2, 3, 1, 4).reshape(batch * height * width, frames, channels)
        h = h + jnp.asarray(sincos_position_embedding(channels, frames), h.dtype)[None]
        h = MultiHeadSelfAttention(self.num_heads, dtype=self.dtype,
                                   out_kernel_init=_zeros if self.zero_init else None,
                                   attention=self.attention, name="attention")(h)
        h = h.reshape(batch, height, width, frames, channels).transpose(0, 3, 1, 2, 4)
        return x + h


class _SpaceTimeResBlock(nn.Module):
    """A :class:`ResBlock` on each frame (1x3x3 kernels), then a :class:`TemporalConv`."""

    features: int
    dropout: float
    scale_shift: bool
    num_groups: int
    dtype: object
    norm_eps: float
    zero_init: bool = True

    @nn.compact
    def __call__(self, x, emb, train: bool):
        h = ResBlock(self.features, self.dropout, self.scale_shift, self.num_groups, self.dtype,
                     self.norm_eps, kernel=(1, 3, 3), frames=True, name="space")(x, emb, train)
        return TemporalConv(self.num_groups, self.dtype, self.zero_init, name="time")(h, train)


class _SpaceTimeAttention(nn.Module):
    """Spatial attention on each frame (text cross-attention too), then attention across frames."""

    num_heads: int
    depth: int
    num_groups: int
    dtype: object
    attention: str
    text: bool
    zero_init: bool = True

    @nn.compact
    def __call__(self, x, context=None, context_mask=None):
        batch, frames = x.shape[:2]
        frames_as_images = x.reshape((batch * frames,) + x.shape[2:])
        if self.text:
            repeat = lambda a: None if a is None else jnp.repeat(a, frames, axis=0)  # noqa: E731
            h = SpatialTransformer(self.num_heads, self.depth, self.num_groups, self.dtype,
                                   self.attention, name="space")(
                frames_as_images, repeat(context), repeat(context_mask))
        else:
            h = AttentionBlock(self.num_heads, self.num_groups, self.dtype, self.attention,
                               name="space")(frames_as_images)
        return TemporalAttention(self.num_heads, self.num_groups, self.dtype, self.attention,
                                 self.zero_init, name="time")(h.reshape(x.shape))


class VideoUNet(UNet):
    """Factorised space-time UNet on [batch, frames, height, width, channels] clips.

    The attributes are :class:`~diffusion_jax.models.unet.UNet`'s, read per frame
    (``attention_resolutions`` are frame heights); the frame count may be anything. Called as
    the UNet is (labels, text context, pooled text); ControlNet residuals are not supported.
    ``temporal_init`` (one of TEMPORAL_INITS) starts the temporal layers' output projections at
    zero (``"zeros"``, for inflating an image model) or at Flax's random defaults."""

    temporal_init: str = "zeros"

    def _kernel(self, h, size: int = 3):
        return (1, size, size)  # one frame at a time; TemporalConv mixes the frames

    def _conv(self, *args, **kwargs):
        return FrameConv(*args, **kwargs)

    def _norm(self, name):
        return GroupNorm(self.num_groups, self.norm_eps, dtype=self.dtype, per_frame=True,
                         name=name)

    def _check_input(self, x):
        if x.ndim != 5:
            raise ValueError("VideoUNet expects clips [batch, frames, height, width, channels], "
                             f"got {x.shape}")
        levels = len(self.channel_mult)
        if x.shape[2] % 2 ** (levels - 1) or x.shape[3] % 2 ** (levels - 1):
            raise ValueError(f"frame size {x.shape[2:4]} must be divisible by "
                             f"{2 ** (levels - 1)} for {levels} resolution levels")

    def _downsample(self, h, name):
        return FrameConv(h.shape[-1], (1, 3, 3), strides=(1, 2, 2),
                         padding=((0, 0), (1, 1), (1, 1)), dtype=self.dtype, name=name)(h)

    def _upsample(self, h, name):
        return FrameConv(h.shape[-1], (1, 3, 3), dtype=self.dtype,
                         name=name)(upsample_nearest(h, axes=(2, 3)))

    def _has_attention(self, h, level):
        if self.attention_levels is not None:
            return level in self.attention_levels
        return h.shape[2] in self.attention_resolutions

    def _res_block(self, features, name):
        block = nn.remat(_SpaceTimeResBlock, static_argnums=(3,)) if self.remat \
            else _SpaceTimeResBlock
        return block(features, self.dropout, self.scale_shift, self.num_groups, self.dtype,
                     self.norm_eps, self._zero_init(), name=name)

    def _attention(self, h, name, level, context, context_mask):
        heads = self._heads(h, name, level)
        depth = self._per_level(self.transformer_depth, "transformer_depth")[level]
        block = nn.remat(_SpaceTimeAttention) if self.remat else _SpaceTimeAttention
        return block(heads, depth, self.num_groups, self.dtype, self.attention,
                     self.context_dim is not None, self._zero_init(), name=name)(
            h, context, context_mask)

    def _zero_init(self) -> bool:
        if self.temporal_init not in TEMPORAL_INITS:
            raise ValueError(f"temporal_init={self.temporal_init!r} is not one of "
                             f"{TEMPORAL_INITS}")
        return self.temporal_init == "zeros"
