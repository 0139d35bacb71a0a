"""A UNet denoiser in the DDPM / ADM style (Ho et al. 2020; Dhariwal & Nichol 2021).

Residual blocks with GroupNorm and SiLU, the noise-level embedding added per block (or applied as
a scale and shift, ADM's "AdaGN"), self-attention at chosen resolutions, strided-convolution
downsampling and nearest-neighbour upsampling, dropout, and optional class conditioning with a null
label for classifier-free guidance. Layout NHWC, or [batch, length, channels] for 1-D signals
(audio: the same blocks with 1-D convolutions); parameters float32; computation in ``dtype``.

With ``channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,)``
on 32x32x3 images it is DDPM's CIFAR-10 network, 35,746,307 parameters.

Text conditioning (Rombach et al. 2022, Stable Diffusion): with ``context_dim`` set, the attention
blocks become transformer blocks that also cross-attend to a sequence of text-token embeddings,
and ``pooled_dim`` adds a projected pooled text embedding to the noise-level embedding.
:func:`sd15_unet` builds Stable Diffusion 1.5's denoiser shape. ``remat=True`` recomputes each
block's activations in the backward pass instead of storing them (same parameters, same numbers,
less memory). In training (``train=True``) the residual blocks' GroupNorms use a written-out
gradient (:func:`~diffusion_jax.models.layers.group_norm`, fewer kernels); otherwise the UNet
can also be differentiated in forward mode (``jax.jvp``), as the likelihood does.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models.layers import (
    FrameConv,
    GEGLUFeedForward,
    GroupNorm,
    MultiHeadCrossAttention,
    MultiHeadSelfAttention,
    NoiseLevelEmbedding,
    add_class_embedding,
    add_pooled_embedding,
    prepare_context,
    sinusoidal_embedding,
    upsample_nearest,
)

__all__ = ["UNet", "ResBlock", "AttentionBlock", "TransformerBlock", "SpatialTransformer",
           "sd15_unet", "SD15_UNET_PARAMETERS"]

Dtype = Any
_zeros = nn.initializers.zeros


class ResBlock(nn.Module):
    """Residual block of the UNet, conditioned on the noise-level (and class/text) embedding.

    GN -> SiLU -> conv -> (+ embedding, or scale/shift) -> GN -> SiLU -> dropout -> conv, plus a
    1x1 projection of the input when the channel count changes."""

    features: int
    dropout: float = 0.0
    scale_shift: bool = False
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    norm_eps: float = 1e-6
    kernel: Optional[tuple] = None  # default: 3 along every spatial axis (3x3 on images)
    frames: bool = False  # [batch, frames, H, W, C] clips: convolve and normalise each frame

    @nn.compact
    def __call__(self, x, emb, train: bool):
        kernel = self.kernel or (3,) * (x.ndim - 2)
        conv = FrameConv if self.frames else nn.Conv
        h = nn.silu(GroupNorm(self.num_groups, self.norm_eps, dtype=self.dtype,
                              per_frame=self.frames, name="norm_0")(x, train))
        h = conv(self.features, kernel, dtype=self.dtype, name="conv_0")(h)
        emb_out = nn.Dense(
            2 * self.features if self.scale_shift else self.features, dtype=self.dtype,
            name="emb",
        )(nn.silu(emb))
        emb_out = emb_out.reshape(emb_out.shape[:1] + (1,) * (x.ndim - 2) + emb_out.shape[1:])
        h_norm = GroupNorm(self.num_groups, self.norm_eps, dtype=self.dtype,
                           per_frame=self.frames, name="norm_1")
        if self.scale_shift:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = h_norm(h, train) * (1 + scale) + shift
        else:
            h = h_norm(h + emb_out, train)
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
        # Zero-initialised so that every block starts as the identity (Ho et al. 2020).
        h = conv(self.features, kernel, dtype=self.dtype, kernel_init=_zeros, name="conv_1")(h)
        if x.shape[-1] != self.features:
            x = conv(self.features, (1,) * len(kernel), dtype=self.dtype, name="skip")(x)
        return x + h


class AttentionBlock(nn.Module):
    """GroupNorm, multi-head self-attention over all pixels (or samples), residual connection."""

    num_heads: int = 1
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x):
        h = GroupNorm(self.num_groups, dtype=self.dtype, name="norm")(x)
        h = h.reshape(x.shape[0], -1, x.shape[-1])
        h = MultiHeadSelfAttention(self.num_heads, dtype=self.dtype, out_kernel_init=_zeros,
                                   attention=self.attention, name="attention")(h)
        return x + h.reshape(x.shape)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block on [batch, tokens, channels].

    LayerNorm -> self-attention, LayerNorm -> cross-attention to the context, LayerNorm -> GEGLU
    feed-forward, each added to its input (Stable Diffusion's BasicTransformerBlock; no biases on
    the q/k/v projections)."""

    num_heads: int
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, tokens, context, context_mask=None):
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)  # noqa: E731
        tokens = tokens + MultiHeadSelfAttention(
            self.num_heads, dtype=self.dtype, qkv_bias=False, attention=self.attention,
            name="self_attention")(
                norm("norm_0")(tokens))
        tokens = tokens + MultiHeadCrossAttention(
            self.num_heads, dtype=self.dtype, qkv_bias=False, attention=self.attention,
            name="cross_attention")(
                norm("norm_1")(tokens), context, context_mask)
        return tokens + GEGLUFeedForward(4, dtype=self.dtype, name="feed_forward")(
            norm("norm_2")(tokens))


class SpatialTransformer(nn.Module):
    """Transformer blocks over all pixels of a feature map, added to it; starts as the identity.

    GroupNorm -> linear projection in -> ``depth`` :class:`TransformerBlock` s over all pixels
    -> zero-initialised linear projection out, plus the input (Stable Diffusion's
    SpatialTransformer / diffusers' Transformer2DModel with a linear projection, which has the
    same parameter count as its 1x1 convolutions)."""

    num_heads: int
    depth: int = 1
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x, context, context_mask=None):
        channels = x.shape[-1]
        h = GroupNorm(self.num_groups, dtype=self.dtype, name="norm")(x)
        h = nn.Dense(channels, dtype=self.dtype, name="proj_in")(
            h.reshape(x.shape[0], -1, channels))
        for i in range(self.depth):
            h = TransformerBlock(self.num_heads, self.dtype, self.attention, name=f"block_{i}")(
                h, context, context_mask)
        h = nn.Dense(channels, dtype=self.dtype, kernel_init=_zeros, name="proj_out")(h)
        return x + h.reshape(x.shape)


class UNet(nn.Module):
    """UNet denoiser on NHWC images or [batch, length, channels] signals (DDPM/ADM/SD family).

    ``UNet(...)(x, noise_level, labels=None, train=False, context=None, context_mask=None,
    pooled=None, time_ids=None, residuals=None) -> output`` with the shape of x (or
    ``out_channels`` channels); ``residuals`` are ControlNets' (see :meth:`__call__`).

    Attributes:
      channels: base width; level i has ``channels * channel_mult[i]`` channels.
      attention_resolutions: feature-map sizes (height; a signal's length) with attention after
        each res block.
      num_heads: attention heads (unless ``head_dim`` is set).
      head_dim: if set, each attention block has (its channels) // head_dim heads instead.
      num_classes: enables class conditioning; label ``num_classes`` is the null label used for
        classifier-free guidance (``labels=None`` means all null).
      noise_scale: factor applied to the noise level before the sinusoidal embedding.
      scale_shift: ADM-style scale and shift from the embedding instead of addition.
      mid_attention: attention between the two middle res blocks (DDPM, ADM and SD all have it).
      context_dim: width of the text-token embeddings ``context`` [batch, length, context_dim];
        turns every attention block into a :class:`SpatialTransformer` that cross-attends to it
        (``context_mask`` [batch, length], True = a real token). ``context=None``, or a row whose
        mask is all False, means no text: the cross-attention sub-layers then add exactly zero.
        None: no cross-attention parameters at all.
      pooled_dim: width of a pooled text embedding ``pooled`` [batch, pooled_dim], added to the
        noise-level embedding through a Dense layer (``pooled=None`` counts as zeros).
      transformer_depth: transformer blocks per :class:`SpatialTransformer`: one number, or one
        per level (the middle block takes the last level's).
      attention_levels: if set, the levels (0 = full resolution) whose res blocks are followed
        by attention, instead of choosing them by ``attention_resolutions``; Stable Diffusion's
        UNets fix attention per level, whatever the image size.
      num_heads may also be one number per level (the middle block takes the last level's).
      norm_eps: epsilon of the res blocks' and the output's GroupNorms (Stable Diffusion:
        1e-5; the attention blocks' norms keep 1e-6).
      noise_shift: added to ``noise_level * noise_scale`` before the sinusoidal embedding;
        Stable Diffusion's networks take diffusers' integer timestep k = 1000 t - 1.
      time_ids_dim: Stable Diffusion XL's added conditioning ("text_time"): ``time_ids``
        [batch, n] (original size, crop offset, target size) each get ``time_ids_dim`` sinusoidal
        features, are concatenated with ``pooled`` [batch, pooled_dim] and added to the
        noise-level embedding through Dense -> SiLU -> Dense (instead of ``pooled_dim``'s single
        Dense layer).
      remat: recompute each res / attention block in the backward pass (``nn.remat``); the
        parameters and results are the same, activation memory is lower.
      attention: the attention kernel, "xla", "cudnn" or "auto" (see
        :func:`~diffusion_jax.models.layers.dot_product_attention`); same parameters.
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
    head_dim: Optional[int] = None
    mid_attention: bool = True
    context_dim: Optional[int] = None
    pooled_dim: Optional[int] = None
    transformer_depth: Union[int, Sequence[int]] = 1
    remat: bool = False
    attention: str = "xla"
    attention_levels: Optional[Sequence[int]] = None
    norm_eps: float = 1e-6
    noise_shift: float = 0.0
    time_ids_dim: Optional[int] = None
    dtype: Dtype = jnp.float32

    def _per_level(self, value, name):
        if isinstance(value, int):
            return (value,) * len(self.channel_mult)
        value = tuple(value)
        if len(value) != len(self.channel_mult):
            raise ValueError(f"UNet {name}={value} needs one entry per level "
                             f"({len(self.channel_mult)})")
        return value

    # The spatial layout: NHWC images, or [batch, length, channels] signals (audio). Every
    # convolution spans all spatial axes; a subclass (the video UNet) may choose otherwise.

    def _kernel(self, h, size: int = 3):
        return (size,) * (h.ndim - 2)

    def _conv(self, *args, **kwargs):
        """The convolution of ``conv_in`` and ``conv_out``: ``nn.Conv``'s arguments."""
        return nn.Conv(*args, **kwargs)

    def _norm(self, name):
        """The GroupNorm before ``conv_out``."""
        return GroupNorm(self.num_groups, self.norm_eps, dtype=self.dtype, name=name)

    def _check_input(self, x):
        if x.ndim not in (3, 4):
            raise ValueError("UNet expects NHWC images [batch, height, width, channels] or "
                             f"signals [batch, length, channels], got {x.shape}")
        levels = len(self.channel_mult)
        if any(size % 2 ** (levels - 1) for size in x.shape[1:-1]):
            what = "image size" if x.ndim == 4 else "signal length"
            raise ValueError(
                f"{what} {x.shape[1:-1]} must be divisible by {2 ** (levels - 1)} for "
                f"{levels} resolution levels"
            )

    def _downsample(self, h, name):
        """Halve every spatial axis: a stride-2 3x3 (or 3) convolution."""
        nd = h.ndim - 2
        return nn.Conv(h.shape[-1], self._kernel(h), strides=(2,) * nd, padding=((1, 1),) * nd,
                       dtype=self.dtype, name=name)(h)

    def _upsample(self, h, name):
        """Double every spatial axis: nearest neighbour, then a 3x3 (or 3) convolution."""
        return nn.Conv(h.shape[-1], self._kernel(h), dtype=self.dtype,
                       name=name)(upsample_nearest(h))

    @nn.compact
    def __call__(self, x, noise_level, labels=None, train: bool = False, context=None,
                 context_mask=None, pooled=None, time_ids=None, residuals=None):
        """The denoiser's output for ``x`` at ``noise_level``.

        ``residuals`` (from :class:`~diffusion_jax.models.controlnet.ControlNet` s) is None or
        ``(down, mid)``: one array per skip connection, added to it before the decoder reads it,
        and one added to the middle block's output (Zhang et al. 2023, ControlNet)."""
        emb, context, context_mask = self.conditioning(x, noise_level, labels, context,
                                                       context_mask, pooled, time_ids)
        h = self._conv(self.channels, self._kernel(x), dtype=self.dtype,
                       name="conv_in")(x.astype(self.dtype))
        h, skips = self.encode(h, emb, train, context, context_mask)
        if residuals is not None:
            down, mid = residuals
            if len(down) != len(skips):
                raise ValueError(f"{len(down)} ControlNet residuals for {len(skips)} skip "
                                 "connections: the ControlNet was built for another UNet")
            for feature, residual in [*zip(skips, down), (h, mid)]:
                _check_residual(feature, residual)
            skips = [skip + residual.astype(skip.dtype) for skip, residual in zip(skips, down)]
            h = h + mid.astype(h.dtype)
        return self.decode(h, skips, emb, train, x.shape[-1], context, context_mask)

    # The network in three parts, which a ControlNet (a copy of the encoder and the middle block)
    # shares: called from a compact method, each creates its layers under the caller's names.

    def conditioning(self, x, noise_level, labels, context, context_mask, pooled, time_ids):
        """``(emb, context, context_mask)``: the embedding every res block reads, and the text."""
        self._check_input(x)
        emb_dim = 4 * self.channels
        noise_level = jnp.broadcast_to(noise_level, x.shape[:1])
        emb = NoiseLevelEmbedding(emb_dim, self.channels, self.noise_scale, dtype=self.dtype,
                                  shift=self.noise_shift, name="noise_embedding")(noise_level)
        emb = add_class_embedding(emb, labels, self.num_classes, self.dtype, "UNet")
        if self.time_ids_dim is None:
            if time_ids is not None:
                raise ValueError("time_ids were given but the UNet has no time_ids_dim")
            emb = add_pooled_embedding(emb, pooled, self.pooled_dim, self.dtype, "UNet")
        else:
            emb = emb + self._added_embedding(pooled, time_ids, x.shape[0], emb_dim)
        context, context_mask = prepare_context(context, context_mask, self.context_dim,
                                                x.shape[0], self.dtype, "UNet")
        return emb, context, context_mask

    def _res_block(self, features, name):
        # nn.remat keeps each block's name, so the parameter tree is the same with remat on or
        # off; `train` (argument 3, counting self) selects dropout and must stay a Python bool.
        res_class = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock
        return res_class(features, self.dropout, self.scale_shift, self.num_groups, self.dtype,
                         self.norm_eps, name=name)

    def _has_attention(self, h, level):
        if self.attention_levels is not None:
            return level in self.attention_levels
        return h.shape[1] in self.attention_resolutions

    def _heads(self, h, name, level) -> int:
        """The attention heads of block ``name`` at ``level`` over features ``h``."""
        heads = self._per_level(self.num_heads, "num_heads")[level]
        if self.head_dim:
            if h.shape[-1] % self.head_dim:
                raise ValueError(f"{h.shape[-1]} channels in {name} do not split into heads "
                                 f"of head_dim={self.head_dim}")
            heads = h.shape[-1] // self.head_dim
        return heads

    def _attention(self, h, name, level, context, context_mask):
        heads = self._heads(h, name, level)
        if self.context_dim is None:
            attention_class = nn.remat(AttentionBlock) if self.remat else AttentionBlock
            return attention_class(heads, self.num_groups, self.dtype, self.attention,
                                   name=name)(h)
        transformer_class = nn.remat(SpatialTransformer) if self.remat else SpatialTransformer
        depth = self._per_level(self.transformer_depth, "transformer_depth")[level]
        return transformer_class(heads, depth, self.num_groups, self.dtype, self.attention,
                                 name=name)(h, context, context_mask)

    def encode(self, h, emb, train, context, context_mask):
        """The down path and the middle block, from ``conv_in``'s output: ``(h, skips)``.

        ``skips`` are the feature maps the decoder concatenates, in diffusers' order
        (``conv_in``'s output, each res/attention block's, each downsampling's)."""
        levels = len(self.channel_mult)
        skips = [h]
        for level, mult in enumerate(self.channel_mult):
            for block in range(self.num_res_blocks):
                h = self._res_block(self.channels * mult, f"down_{level}_res_{block}")(
                    h, emb, train)
                if self._has_attention(h, level):
                    h = self._attention(h, f"down_{level}_attn_{block}", level, context,
                                        context_mask)
                skips.append(h)
            if level != levels - 1:
                h = self._downsample(h, f"down_{level}_downsample")
                skips.append(h)

        h = self._res_block(h.shape[-1], "mid_res_0")(h, emb, train)
        if self.mid_attention:
            h = self._attention(h, "mid_attn", levels - 1, context, context_mask)
        h = self._res_block(h.shape[-1], "mid_res_1")(h, emb, train)
        return h, skips

    def decode(self, h, skips, emb, train, in_channels, context, context_mask):
        """The up path from the middle block's output and the skips, to the output (float32)."""
        skips = list(skips)
        for level in reversed(range(len(self.channel_mult))):
            for block in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = self._res_block(self.channels * self.channel_mult[level],
                                    f"up_{level}_res_{block}")(h, emb, train)
                if self._has_attention(h, level):
                    h = self._attention(h, f"up_{level}_attn_{block}", level, context,
                                        context_mask)
            if level != 0:
                h = self._upsample(h, f"up_{level}_upsample")

        h = nn.silu(self._norm("norm_out")(h, train))
        out = self._conv(self.out_channels or in_channels, self._kernel(h), dtype=self.dtype,
                         kernel_init=_zeros, name="conv_out")(h)
        return out.astype(jnp.float32)

    def _added_embedding(self, pooled, time_ids, batch, emb_dim):
        """SDXL's "text_time" conditioning: [pooled, sinusoidal(time_ids)] -> Dense-SiLU-Dense."""
        if pooled is None or time_ids is None or self.pooled_dim is None:
            raise ValueError("a UNet with time_ids_dim (Stable Diffusion XL) needs pooled "
                             "[batch, pooled_dim] and time_ids [batch, n], and pooled_dim set")
        pooled = jnp.asarray(pooled)
        time_ids = jnp.asarray(time_ids)
        if pooled.shape != (batch, self.pooled_dim) or time_ids.ndim != 2 or \
                time_ids.shape[0] != batch:
            raise ValueError(f"the UNet expects pooled [batch={batch}, {self.pooled_dim}] and "
                             f"time_ids [batch={batch}, n], got {pooled.shape} and "
                             f"{time_ids.shape}")
        features = sinusoidal_embedding(time_ids.reshape(-1), self.time_ids_dim)
        features = features.reshape(batch, -1)
        h = jnp.concatenate([pooled.astype(jnp.float32), features], axis=-1).astype(self.dtype)
        h = nn.Dense(emb_dim, dtype=self.dtype, name="added_embedding_0")(h)
        return nn.Dense(emb_dim, dtype=self.dtype, name="added_embedding_1")(nn.silu(h))


def _check_residual(feature, residual):
    """A ControlNet residual must match its feature map (or be pooled to 1x1 over the image)."""
    same = residual.ndim == 4 and residual.shape[0] == feature.shape[0] and \
        residual.shape[-1] == feature.shape[-1] and \
        tuple(residual.shape[1:3]) in (tuple(feature.shape[1:3]), (1, 1))
    if not same:
        raise ValueError(f"a ControlNet residual of shape {residual.shape} meets a UNet feature "
                         f"map of shape {feature.shape}: the ControlNet was built for another UNet")


# Parameters of diffusers' UNet2DConditionModel for runwayml/stable-diffusion-v1-5 (its 1x1
# projection convolutions have the same count as the linear projections used here).
SD15_UNET_PARAMETERS = 859_520_964


def sd15_unet(dtype: Dtype = jnp.float32, remat: bool = False, latent_size: int = 64,
              **overrides) -> UNet:
    """A :class:`UNet` of Stable Diffusion 1.5's denoiser shape (Rombach et al. 2022).

    4 -> 4 latent channels, widths 320, 640, 1280, 1280, two res blocks per level, a depth-1
    :class:`SpatialTransformer` with 8 heads cross-attending to 768-wide CLIP text tokens after
    every res block of the first three levels (64, 32 and 16 for 64x64 latents, i.e. 512x512 images)
    and in the middle block, no class labels, no dropout, GroupNorm epsilon 1e-5 and diffusers'
    timestep k = 1000 t - 1 as the noise input. It has :data:`SD15_UNET_PARAMETERS` parameters
    and computes the same function as diffusers' model from the same weights
    (:mod:`diffusion_jax.pretrained.sd_unet` converts them).

    ``latent_size`` (a multiple of 8) is checked only: attention stays at the first three
    levels for any size. Other :class:`UNet` attributes can be overridden by keyword.
    """
    if latent_size % 8:
        raise ValueError(f"latent_size must be divisible by 8 (4 levels), got {latent_size}")
    kwargs = dict(channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                  attention_levels=(0, 1, 2), num_heads=8, dropout=0.0, out_channels=4,
                  num_groups=32, context_dim=768, norm_eps=1e-5, noise_shift=-1.0,
                  remat=remat, dtype=dtype)
    kwargs.update(overrides)
    return UNet(**kwargs)
