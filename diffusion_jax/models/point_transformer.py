"""A permutation-equivariant transformer denoiser for point clouds.

:class:`PointTransformer` reads a set of points [N, 3 + F] as N tokens with no positional
encoding, so permuting the points permutes its output; blocks are DiT's adaLN-Zero blocks
(:class:`~diffusion_jax.models.dit.DiTBlock`) conditioned on the noise level and class. Each
point's position enters through random Fourier features as well as linearly, which lets
attention resolve fine geometry. It centres the positions it reads and returns positions in the
zero centre-of-mass subspace (see :func:`~diffusion_jax.models.egnn.center_positions`), so it is
translation invariant; unlike :class:`~diffusion_jax.models.egnn.EGNN` it is not
rotation-equivariant, which shapes of no preferred orientation let it learn from data.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.dit import DiTBlock
from diffusion_jax.models.egnn import POSITION_DIMS, center_positions, member_mask
from diffusion_jax.models.layers import NoiseLevelEmbedding, add_class_embedding

__all__ = ["PointTransformer"]

_zeros = nn.initializers.zeros


def _fourier_matrix(frequencies: int, scale: float) -> np.ndarray:
    """A fixed Gaussian projection [3, frequencies] (the same for every model)."""
    rng = np.random.default_rng(0)
    return (rng.standard_normal((POSITION_DIMS, frequencies)) * scale).astype(np.float32)


class PointTransformer(nn.Module):
    """Transformer over the points of a set, conditioned by adaLN-Zero on noise level and class.

    ``PointTransformer(...)(x, noise_level, labels=None, train=False, node_mask=None)`` on
    [batch, N, 3 + F] returns [batch, N, 3 + F] (float32); absent members (``node_mask`` 0) are
    left out of attention and get zeros.

    Attributes:
      hidden, depth, num_heads, mlp_ratio: the transformer.
      fourier_features, fourier_scale: random Fourier features of each position (sin and cos of
        ``fourier_features`` projections with standard deviation ``fourier_scale``).
      num_classes: enables class conditioning; label ``num_classes`` is the null label.
    """

    hidden: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    fourier_features: int = 32
    fourier_scale: float = 1.0
    num_classes: Optional[int] = None
    noise_scale: float = 1000.0
    remat: bool = False
    attention: str = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, noise_level, labels=None, train: bool = False, node_mask=None):
        del train  # no dropout
        if x.ndim != 3 or x.shape[-1] < POSITION_DIMS:
            raise ValueError("PointTransformer expects sets [batch, points, 3 + features], got "
                             f"{x.shape}")
        batch = x.shape[0]
        mask = member_mask(x, node_mask)
        x = center_positions(x.astype(jnp.float32), mask)
        projected = x[..., :POSITION_DIMS] @ _fourier_matrix(self.fourier_features,
                                                              self.fourier_scale)
        inputs = jnp.concatenate([x, jnp.sin(projected), jnp.cos(projected)], axis=-1)
        tokens = nn.Dense(self.hidden, dtype=self.dtype, name="embed")(inputs.astype(self.dtype))
        cond = NoiseLevelEmbedding(self.hidden, 256, self.noise_scale, dtype=self.dtype,
                                   name="noise_embedding")(jnp.broadcast_to(noise_level, (batch,)))
        cond = add_class_embedding(cond, labels, self.num_classes, self.dtype, "PointTransformer")
        block_class = nn.remat(DiTBlock) if self.remat else DiTBlock
        attend = None if node_mask is None else mask > 0
        for i in range(self.depth):
            tokens = block_class(self.hidden, self.num_heads, self.mlp_ratio, dtype=self.dtype,
                                 attention=self.attention, name=f"block_{i}")(
                tokens, cond, None, None, attend)
        shift, scale = jnp.split(nn.Dense(2 * self.hidden, dtype=self.dtype, kernel_init=_zeros,
                                          name="final_adaln")(nn.silu(cond)), 2, axis=-1)
        tokens = nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=self.dtype,
                              name="final_norm")(tokens)
        tokens = tokens * (1 + scale[:, None, :]) + shift[:, None, :]
        # No bias: a bias of the position channels would be removed by the centring below, so
        # its gradient is 0 and its value only Adam's steps of round-off.
        out = nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=_zeros, use_bias=False,
                       name="final_linear")(tokens)
        return center_positions(out.astype(jnp.float32), mask)

