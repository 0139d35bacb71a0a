"""A small network that reads one video frame of a moving shape: its attributes and centre.

:class:`FrameJudge` is the judge of :mod:`diffusion_jax.video_eval`; none of its parameters
depends on the frame's size. Each pixel's colour and its difference from the frame's median
colour (the background's, as long as the object covers less than half the frame) go through a
per-pixel MLP, which a summary of the whole frame then modulates. A heatmap logit per pixel
gives the object's centre as a soft-argmax (the heatmap's expected pixel centre), exact to a
fraction of a pixel at any resolution. For shape, colour and background, residual 3x3
convolutions (dilations 1, 1, 2 and 4) read the per-pixel features on a grid of 16 to 31
pixels a side (frames of 32 pixels or more are average-pooled by an integer factor first, so
the cost grows little with resolution); their output, pooled with the heatmap's weights (the
object), evenly and by maximum, feeds the three softmax heads.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["FrameJudge", "soft_argmax"]


def soft_argmax(logits):
    """Expected pixel centre ``(y, x)`` in [0, 1] of a softmax over ``logits`` [n, H, W].

    Pixel (i, j) has its centre at ``((i + 0.5) / H, (j + 0.5) / W)``, as in MovingShapes."""
    n, height, width = logits.shape
    weights = jax.nn.softmax(logits.reshape(n, -1), axis=-1).reshape(n, height, width)
    ys = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height
    xs = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width
    return jnp.stack([jnp.einsum("nhw,h->n", weights, ys),
                      jnp.einsum("nhw,w->n", weights, xs)], axis=-1)


class FrameJudge(nn.Module):
    """Reads a frame's shape, object colour, background colour and object centre.

    ``FrameJudge()(frames) -> {"shape": logits [n, num_shapes], "colour": logits [n,
    num_colours], "background": logits [n, num_colours], "centre": [n, 2]}`` for frames
    [n, H, W, 3] in [-1, 1]; the centre is ``(y, x)`` in [0, 1] (y downwards), the soft-argmax
    of a learned heatmap (:func:`soft_argmax`). The parameters do not depend on H or W."""

    num_shapes: int = 3
    num_colours: int = 6
    width: int = 32

    @nn.compact
    def __call__(self, frames, train: bool = False):
        del train  # no dropout or batch statistics; kept for the classifiers' calling convention
        x = frames.astype(jnp.float32)
        n = x.shape[0]
        # The per-channel median of a frame is its background's colour when the object covers
        # less than half of it; each pixel's difference from it marks the object.
        background = jnp.median(x.reshape(n, -1, x.shape[-1]), axis=1)
        x = jnp.concatenate([x, x - background[:, None, None, :]], axis=-1)
        pixel = nn.silu(nn.Dense(self.width, name="pixel_0")(x))  # each pixel's colour
        pixel = pixel + nn.silu(nn.Dense(self.width, name="pixel_1")(pixel))
        context = nn.Dense(self.width, name="context")(jnp.mean(pixel, axis=(1, 2)))
        pixel = nn.silu(nn.Dense(self.width, name="mix")(pixel) + context[:, None, None, :])
        heatmap = nn.Dense(1, name="heatmap")(pixel)[..., 0]
        centre = soft_argmax(heatmap)
        weights = jax.nn.softmax(heatmap.reshape(n, -1), axis=-1).reshape(heatmap.shape)
        factor = max(1, min(x.shape[1], x.shape[2]) // 16)
        h = jnp.concatenate([x, pixel], axis=-1)
        if factor > 1:
            h = nn.avg_pool(h, (factor, factor), (factor, factor))
            weights = nn.avg_pool(weights[..., None], (factor, factor), (factor, factor))[..., 0]
        h = nn.silu(nn.Conv(self.width, (1, 1), name="stem")(h))
        for i, dilation in enumerate((1, 1, 2, 4)):
            h = h + nn.silu(nn.Conv(self.width, (3, 3), kernel_dilation=dilation,
                                    name=f"conv_{i}")(h))
        weights = weights / jnp.sum(weights, axis=(1, 2), keepdims=True)
        on_object = jnp.einsum("nhw,nhwc->nc", weights, h)
        features = jnp.concatenate([on_object, jnp.mean(h, axis=(1, 2)), jnp.max(h, axis=(1, 2))],
                                   axis=-1)
        features = nn.silu(nn.Dense(2 * self.width, name="features")(features))
        return {"shape": nn.Dense(self.num_shapes, name="head_shape")(features),
                "colour": nn.Dense(self.num_colours, name="head_colour")(features),
                "background": nn.Dense(self.num_colours, name="head_background")(features),
                "centre": centre}
