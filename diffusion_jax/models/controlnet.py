"""ControlNet (Zhang et al. 2023): a trainable copy of a UNet's encoder that reads a control image.

A :class:`ControlNet` has the :class:`~diffusion_jax.models.unet.UNet`'s attributes, noise-level
and text conditioning, ``conv_in``, down path and middle block, under the same parameter names,
so that it starts as a copy of a base UNet's (:func:`init_from_base`). A small convolutional
encoder (``control_embedding``: ``conv_in``, then pairs of a 3x3 and a stride-2 3x3 convolution,
SiLU after each, and a zero-initialised ``conv_out``) takes the control image from its own
resolution down to the UNet's and is added to ``conv_in``'s output (the paper's Eq. 2 with the
condition encoder of its Section 3.2). Each skip connection and the middle block's output then
pass through a zero-initialised 1x1 convolution (``control_down_{i}``, ``control_mid``): these
"zero convolutions" make the residuals exactly zero before training, so the controlled model
starts as the base model.

:class:`ControlledUNet` runs a base UNet with any number of ControlNets, each with its own
control image and scale, and adds their scaled residuals to the UNet's skip connections and
middle block (as diffusers' ``MultiControlNetModel`` sums them). Diffusers' ``ControlNetModel``
folders convert onto :class:`ControlNet` (:mod:`diffusion_jax.pretrained.controlnet`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import flax.traverse_util
import jax.numpy as jnp

import jax

from diffusion_jax.models.dit import DiT
from diffusion_jax.models.unet import UNet

__all__ = ["ControlNet", "DiTControlNet", "ControlledUNet", "controlnet_for", "init_from_base",
           "embedding_channels_for", "OWN_PREFIX", "SHARED_PREFIXES",
           "DIFFUSERS_EMBEDDING_CHANNELS"]

_zeros = nn.initializers.zeros

# Stable Diffusion ControlNets' condition encoder: images 8x the latents' size.
DIFFUSERS_EMBEDDING_CHANNELS = (16, 32, 96, 256)

# The ControlNet's own layers; every other parameter is a copy of its base UNet's, from these
# of the UNet's layers.
OWN_PREFIX = "control_"
SHARED_PREFIXES = ("noise_embedding", "class_embedding", "pooled_embedding", "added_embedding",
                   "conv_in", "down_", "mid_")


def embedding_channels_for(factor: int, widths: Sequence[int] = DIFFUSERS_EMBEDDING_CHANNELS):
    """Condition-encoder widths for control images ``factor`` (a power of 2) times the UNet's size.

    One stride-2 stage per halving: 1 -> ``(16,)``, 8 -> ``(16, 32, 96, 256)`` (Stable
    Diffusion's); beyond the four given widths, the last repeats."""
    if factor < 1 or factor & (factor - 1):
        raise ValueError(f"the control image must be a power of 2 times the denoiser's input "
                         f"size, got a factor of {factor}")
    stages = factor.bit_length()  # 1 + log2(factor)
    widths = tuple(widths)
    return widths[:stages] + (widths[-1],) * max(0, stages - len(widths))


def _check_control(factor, channels, x_shape, control_shape):
    expected = (x_shape[1] * factor, x_shape[2] * factor, channels)
    if len(control_shape) != 4 or tuple(control_shape[1:]) != expected or \
            control_shape[0] not in (1, x_shape[0]):
        raise ValueError(
            f"the control image has shape {tuple(control_shape)}, but this ControlNet takes "
            f"[batch, {expected[0]}, {expected[1]}, {expected[2]}] for inputs of shape "
            f"{tuple(x_shape)} ({factor}x their size, {channels} channels in [0, 1]); resize "
            f"the control image to the generated image's size and give it {channels} channels")


class ControlEmbedding(nn.Module):
    """The control image's encoder: [B, f H, f W, c] -> [B, H, W, out_channels], f = 2^(n-1).

    conv 3x3 (widths[0]) -> SiLU -> n - 1 times (conv 3x3, SiLU, stride-2 conv 3x3 to the next
    width, SiLU) -> zero-initialised conv 3x3 to ``out_channels``."""

    widths: Sequence[int]
    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, control):
        h = nn.silu(nn.Conv(self.widths[0], (3, 3), dtype=self.dtype, name="conv_in")(control))
        for i in range(len(self.widths) - 1):
            h = nn.silu(nn.Conv(self.widths[i], (3, 3), dtype=self.dtype,
                                name=f"conv_{2 * i}")(h))
            h = nn.silu(nn.Conv(self.widths[i + 1], (3, 3), strides=(2, 2),
                                padding=((1, 1), (1, 1)), dtype=self.dtype,
                                name=f"conv_{2 * i + 1}")(h))
        return nn.Conv(self.out_channels, (3, 3), dtype=self.dtype, kernel_init=_zeros,
                       name="conv_out")(h)


class ControlNet(UNet):
    """A UNet's encoder and middle block reading a control image; returns the UNet's residuals.

    ``ControlNet(...)(x, noise_level, control, labels=None, train=False, context=None,
    context_mask=None, pooled=None, time_ids=None) -> (down, mid)``: ``down`` holds one array
    per skip connection of the UNet with the same attributes (zero-initialised 1x1 convolutions
    of the copy's own skips), ``mid`` one for the middle block's output. ``control`` is
    [batch, f height, f width, control_channels] in [0, 1], ``f = 2 ** (len(embedding_channels)
    - 1)`` (8 for Stable Diffusion's latents, 1 for a pixel-space UNet).

    Attributes (besides the UNet's, which must be the base's):
      control_channels: channels of the control image (3: RGB, as diffusers' ControlNets).
      embedding_channels: widths of the control image's encoder (:class:`ControlEmbedding`).
      pool_residuals: average each residual over the image (diffusers'
        ``global_pool_conditions``, for controls without layout such as a shuffled image).
      bgr: the control image's channels are read in reverse order (diffusers'
        ``controlnet_conditioning_channel_order="bgr"``).
    """

    control_channels: int = 3
    embedding_channels: Sequence[int] = (16,)
    pool_residuals: bool = False
    bgr: bool = False

    @property
    def control_factor(self) -> int:
        """How many times larger than the denoiser's input the control image is."""
        return 2 ** (len(self.embedding_channels) - 1)

    def check_control(self, x_shape, control_shape):
        """Raise a ValueError unless a control of ``control_shape`` fits inputs of ``x_shape``."""
        _check_control(self.control_factor, self.control_channels, x_shape, control_shape)

    @nn.compact
    def __call__(self, x, noise_level, control, labels=None, train: bool = False, context=None,
                 context_mask=None, pooled=None, time_ids=None):
        control = jnp.asarray(control)
        self.check_control(x.shape, control.shape)
        control = jnp.broadcast_to(control, (x.shape[0],) + control.shape[1:])
        if self.bgr:
            control = control[..., ::-1]
        emb, context, context_mask = self.conditioning(x, noise_level, labels, context,
                                                       context_mask, pooled, time_ids)
        h = nn.Conv(self.channels, (3, 3), dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
        h = h + ControlEmbedding(tuple(self.embedding_channels), self.channels, self.dtype,
                                 name="control_embedding")(control.astype(self.dtype))
        h, skips = self.encode(h, emb, train, context, context_mask)
        down = [nn.Conv(skip.shape[-1], (1, 1), dtype=self.dtype, kernel_init=_zeros,
                        name=f"control_down_{i}")(skip) for i, skip in enumerate(skips)]
        mid = nn.Conv(h.shape[-1], (1, 1), dtype=self.dtype, kernel_init=_zeros,
                      name="control_mid")(h)
        if self.pool_residuals:
            down = [jnp.mean(r, axis=(1, 2), keepdims=True) for r in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return tuple(down), mid


class DiTControlNet(DiT):
    """A DiT's embedding and first blocks reading a control image; returns one residual per block.

    PixArt's ControlNet-Transformer (Chen et al. 2024, PixArt-delta): a trainable copy of the
    patch embedding, the conditioning and the first ``control_blocks`` blocks of the base
    :class:`~diffusion_jax.models.dit.DiT` (its attributes, its parameter names). The control
    image goes through :class:`ControlEmbedding` to the input's size and a ``p x p`` patch
    convolution (``control_patch``) into the copy's tokens; each copied block's output passes
    a zero-initialised linear layer (``control_out_{i}``) and is added to the output of the base's
    block ``i``. ``(x, noise_level, control, labels=None, train=False, context=None,
    context_mask=None, pooled=None) -> residuals`` ([batch, tokens, hidden] each).

    Attributes (besides the DiT's, which must be the base's):
      control_blocks: how many of the first blocks are copied (0: half the depth, as PixArt's
        13 of 28).
      control_channels, embedding_channels: as :class:`ControlNet`'s.
    """

    control_blocks: int = 0
    control_channels: int = 3
    embedding_channels: Sequence[int] = (16,)

    @property
    def control_factor(self) -> int:
        """How many times larger than the denoiser's input the control image is."""
        return 2 ** (len(self.embedding_channels) - 1)

    @property
    def copied_blocks(self) -> int:
        """The number of the base's blocks the copy holds."""
        return self.control_blocks or max(self.depth // 2, 1)

    def check_control(self, x_shape, control_shape):
        """Raise a ValueError unless a control of ``control_shape`` fits inputs of ``x_shape``."""
        _check_control(self.control_factor, self.control_channels, x_shape, control_shape)

    @nn.compact
    def __call__(self, x, noise_level, control, labels=None, train: bool = False, context=None,
                 context_mask=None, pooled=None):
        del train  # no dropout in DiT
        control = jnp.asarray(control)
        self.check_control(x.shape, control.shape)
        control = jnp.broadcast_to(control, (x.shape[0],) + control.shape[1:])
        if not 0 < self.copied_blocks <= self.depth:
            raise ValueError(f"control_blocks={self.control_blocks}: a DiT of depth "
                             f"{self.depth} has blocks 1 to {self.depth} to copy")
        tokens, cond, context, context_mask = self.embed(x, noise_level, labels, context,
                                                         context_mask, pooled)
        widths = tuple(self.embedding_channels)
        h = ControlEmbedding(widths, widths[-1], self.dtype, name="control_embedding")(
            control.astype(self.dtype))
        p = self.patch_size
        h = nn.Conv(self.hidden, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    name="control_patch")(h)
        tokens = tokens + h.reshape(tokens.shape)
        residuals = []
        for i in range(self.copied_blocks):
            tokens = self.block(i)(tokens, cond, context, context_mask)
            residuals.append(nn.Dense(self.hidden, dtype=self.dtype, kernel_init=_zeros,
                                      name=f"control_out_{i}")(tokens))
        return tuple(residuals)


def controlnet_for(base, *, embedding_channels: Optional[Sequence[int]] = None,
                   factor: int = 1, control_channels: int = 3, **attributes):
    """The :class:`ControlNet` of a base UNet, or :class:`DiTControlNet` of a base DiT.

    It has the base's attributes; its control images are ``factor`` times the denoiser's input
    size (``embedding_channels`` from :func:`embedding_channels_for` unless given)."""
    kind, cls = (UNet, ControlNet) if isinstance(base, UNet) else (DiT, DiTControlNet)
    if not isinstance(base, (UNet, DiT)):
        raise ValueError(f"a ControlNet copies a UNet's or a DiT's encoder, not a "
                         f"{type(base).__name__}'s")
    fields = {f: getattr(base, f) for f in kind.__dataclass_fields__
              if f not in ("parent", "name")}
    if embedding_channels is None:
        embedding_channels = embedding_channels_for(factor)
    return cls(**fields, control_channels=control_channels,
               embedding_channels=tuple(embedding_channels), **attributes)


def init_from_base(controlnet_params, base_params):
    """A ControlNet's parameters with every layer it shares with the base UNet copied from it.

    ``controlnet_params`` supplies the ControlNet's own layers (names starting with
    :data:`OWN_PREFIX`: the control image's encoder and the zero convolutions); every other one
    must exist in ``base_params`` with the same shape, else a ValueError names the first that
    does not."""
    flat = flax.traverse_util.flatten_dict(controlnet_params)
    base = flax.traverse_util.flatten_dict(base_params)
    out = {}
    for path, leaf in flat.items():
        if not path[0].startswith(OWN_PREFIX):
            if path not in base:
                raise ValueError(f"the base UNet has no parameter {'/'.join(path)}, which the "
                                 "ControlNet copies: it was built for another UNet")
            if base[path].shape != leaf.shape:
                raise ValueError(f"the base UNet's {'/'.join(path)} has shape "
                                 f"{base[path].shape}, the ControlNet's {leaf.shape}: it was "
                                 "built for another UNet")
            leaf = jnp.asarray(base[path], leaf.dtype)
        out[path] = leaf
    return flax.traverse_util.unflatten_dict(out)


def _scales(control_scale, count, batch):
    """The conditioning scales as [batch, count] float32 (None: 1 for every ControlNet)."""
    if control_scale is None:
        return jnp.ones((batch, count), jnp.float32)
    scale = jnp.asarray(control_scale, jnp.float32)
    if scale.ndim == 0:
        scale = jnp.full((count,), scale)
    if scale.ndim == 1:
        if scale.shape[0] != count:
            raise ValueError(f"{scale.shape[0]} conditioning scales for {count} ControlNets")
        scale = scale[None]
    if scale.ndim != 2 or scale.shape[1] != count or scale.shape[0] not in (1, batch):
        raise ValueError(f"conditioning scales of shape {scale.shape}: give one number, one "
                         f"per ControlNet ({count}) or [batch={batch}, {count}]")
    return jnp.broadcast_to(scale, (batch, count))


class ControlledUNet(nn.Module):
    """A base :class:`UNet` (or DiT) guided by ControlNets, each reading its own control image.

    ``unet`` is the base denoiser: a :class:`UNet` with :class:`ControlNet` s, or a
    :class:`~diffusion_jax.models.dit.DiT` with :class:`DiTControlNet` s.

    ``ControlledUNet(unet, controlnets)(x, noise_level, labels=None, train=False, ...,
    control=None, control_scale=None)`` takes the UNet's arguments and:

    control: one control image [batch or 1, H, W, C] (one ControlNet) or a tuple with one per
      ControlNet; None runs the base UNet alone.
    control_scale: the conditioning scale: one number, one per ControlNet, or [batch,
      ControlNets] (None: 1). The residuals are ``sum_i scale_i * controlnet_i(...)``; scale 0
      adds exactly zero.

    ``train`` reaches the ControlNets (their dropout) only: the base UNet is frozen and always
    runs as it does in generation, so that a ControlNet learns residuals for the network it
    will guide.

    Parameters: ``{"unet": ..., "controlnets_0": ..., ...}``.
    """

    unet: nn.Module
    controlnets: Sequence[nn.Module]

    @nn.compact
    def __call__(self, x, noise_level, labels=None, train: bool = False, context=None,
                 context_mask=None, pooled=None, time_ids=None, control=None,
                 control_scale=None):
        text = dict(context=context, context_mask=context_mask, pooled=pooled)
        if time_ids is not None:  # (SDXL's; a DiT has none)
            text["time_ids"] = time_ids
        if control is None:
            return self.unet(x, noise_level, labels, False, **text)
        controls = tuple(control) if isinstance(control, (tuple, list)) else (control,)
        if len(controls) != len(self.controlnets):
            raise ValueError(f"{len(controls)} control images for {len(self.controlnets)} "
                             "ControlNets: give one per ControlNet")
        scales = _scales(control_scale, len(self.controlnets), x.shape[0])
        residuals = None
        for i, (net, image) in enumerate(zip(self.controlnets, controls)):
            scale = scales[:, i]
            scaled = jax.tree_util.tree_map(
                lambda r, s=scale: r * s.reshape((-1,) + (1,) * (r.ndim - 1)).astype(r.dtype),
                net(x, noise_level, image, labels, train, **text))
            residuals = scaled if residuals is None else jax.tree_util.tree_map(
                lambda a, b: a + b, residuals, scaled)
        return self.unet(x, noise_level, labels, False, residuals=residuals, **text)

