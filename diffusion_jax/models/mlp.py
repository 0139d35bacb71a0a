"""A residual MLP denoiser for vector data (2-D toys, point features)."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models.layers import NoiseLevelEmbedding, add_class_embedding

__all__ = ["MLP"]


class MLP(nn.Module):
    """Residual MLP denoiser for vector data.

    ``MLP(...)(x, noise_level, labels=None, train=False)`` on [batch, features] inputs: an input
    projection, ``depth`` residual blocks (LayerNorm, SiLU, Dense, plus the noise-level and
    class embedding), and a zero-initialised output projection."""

    hidden: int = 256
    depth: int = 4
    num_classes: Optional[int] = None
    noise_scale: float = 1000.0
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, noise_level, labels=None, train: bool = False):
        if x.ndim != 2:
            raise ValueError(f"MLP expects [batch, features] inputs, got shape {x.shape}")
        emb = NoiseLevelEmbedding(self.hidden, 64, self.noise_scale, dtype=self.dtype,
                                  name="noise_embedding")(jnp.broadcast_to(noise_level, x.shape[:1]))
        emb = add_class_embedding(emb, labels, self.num_classes, self.dtype, "MLP")
        h = nn.Dense(self.hidden, dtype=self.dtype, name="dense_in")(x.astype(self.dtype))
        for i in range(self.depth):
            r = nn.silu(nn.LayerNorm(dtype=self.dtype, name=f"norm_{i}")(h))
            r = nn.Dense(self.hidden, dtype=self.dtype, name=f"dense_{i}_0")(r + emb)
            r = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(r))
            h = h + nn.Dense(self.hidden, dtype=self.dtype, name=f"dense_{i}_1")(r)
        out = nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=nn.initializers.zeros,
                       name="dense_out")(nn.silu(h))
        return out.astype(jnp.float32)
