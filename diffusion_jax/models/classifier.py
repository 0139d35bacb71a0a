"""A small image classifier whose penultimate layer is a feature space for sample metrics."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

__all__ = ["Classifier"]


class Classifier(nn.Module):
    """``Classifier(num_classes)(images, train=False) -> (logits, features)`` for NHWC images in
    [-1, 1]: two stages of two 3x3 convolutions (GroupNorm, SiLU) with 2x average pooling, a
    global average, and a ``feature_dim``-wide hidden layer whose activations are the features."""

    num_classes: int
    width: int = 32
    feature_dim: int = 128
    dropout: float = 0.2

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = x.astype(jnp.float32)
        for stage, channels in enumerate((self.width, 2 * self.width)):
            for i in range(2):
                h = nn.Conv(channels, (3, 3), name=f"conv_{stage}_{i}")(h)
                h = nn.silu(nn.GroupNorm(num_groups=8, name=f"norm_{stage}_{i}")(h))
            h = nn.avg_pool(h, (2, 2), (2, 2))
        h = jnp.mean(h, axis=(1, 2))
        features = nn.silu(nn.Dense(self.feature_dim, name="features")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(features)
        return nn.Dense(self.num_classes, name="logits")(h), features
