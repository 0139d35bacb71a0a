"""An E(n)-equivariant graph network denoiser for sets of points with features (molecules).

An example is a set of up to N members, [N, 3 + F]: 3-D positions followed by F invariant
features (a molecule's scaled one-hot atom types; none for a bare point cloud), with a
``node_mask`` [N] that is 1 for present members and 0 for padding. Positions live in the
zero centre-of-mass subspace, as equivariant diffusion needs (Hoogeboom et al. 2022, section
3.2): :func:`center_positions` projects onto it, and the networks here project both what they
read and what they return.

:class:`EGNN` follows Satorras et al. 2021 (equations 3-6) with the stabilising choices of
Hoogeboom et al. 2022: coordinate updates along normalised differences ``(x_i - x_j) /
(|x_i - x_j| + 1)`` bounded by ``tanh``, and soft edge gates. Rotating, reflecting or
translating the input rotates or reflects the position output and leaves the features
unchanged; permuting the members permutes the output; absent members take part in no message.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models.layers import NoiseLevelEmbedding, add_class_embedding

__all__ = ["POSITION_DIMS", "center_positions", "member_mask", "EGNN", "EquivariantBlock"]

POSITION_DIMS = 3
_zeros = nn.initializers.zeros


def member_mask(x, node_mask=None):
    """The float32 [batch, N] mask of present members (all present when ``node_mask`` is None)."""
    if node_mask is None:
        return jnp.ones(x.shape[:2], jnp.float32)
    if node_mask.shape != x.shape[:2]:
        raise ValueError(f"node_mask of shape {node_mask.shape} does not fit sets of shape "
                         f"{x.shape} (it needs [batch, members] = {x.shape[:2]})")
    return jnp.asarray(node_mask, jnp.float32)


def center_positions(x, node_mask=None):
    """``x`` [batch, N, 3 + F] with positions moved to zero mean over present members.

    Absent members (``node_mask`` 0) become all zeros, features included; the features of
    present members are unchanged. This is the projection onto the zero centre-of-mass subspace
    in which equivariant diffusion noises and denoises positions."""
    mask = member_mask(x, node_mask)[..., None]
    positions = x[..., :POSITION_DIMS]
    count = jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)
    mean = jnp.sum(positions * mask, axis=1, keepdims=True) / count
    centred = jnp.concatenate([positions - mean, x[..., POSITION_DIMS:]], axis=-1)
    return jnp.where(mask > 0, centred, 0.0).astype(x.dtype)


def _pair_geometry(positions):
    """Differences ``x_i - x_j`` [b, N, N, 3] and squared distances [b, N, N, 1]."""
    diff = positions[:, :, None, :] - positions[:, None, :, :]
    return diff, jnp.sum(jnp.square(diff), axis=-1, keepdims=True)


class EquivariantBlock(nn.Module):
    """One EGNN layer: edge messages, gated sums, a feature update and a coordinate update.

    ``m_ij = phi_e(h_i, h_j, |x_i - x_j|^2, |x_i^0 - x_j^0|^2)``, gated by ``sigmoid(w . m_ij)``
    and summed over present neighbours (divided by ``normalization``); ``h_i += phi_h(h_i,
    m_i)``; ``x_i += sum_j (x_i - x_j) / (|x_i - x_j| + 1) * tanh(phi_x(m_ij)) *
    coordinate_range / normalization`` (Satorras et al. 2021, equations 3-6)."""

    hidden: int
    normalization: float = 1.0
    coordinate_range: float = 15.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, positions, edge_mask, initial_sq):
        n = h.shape[1]
        diff, sq = _pair_geometry(positions)
        pair = jnp.concatenate([
            jnp.broadcast_to(h[:, :, None, :], h.shape[:2] + (n, h.shape[-1])),
            jnp.broadcast_to(h[:, None, :, :], h.shape[:2] + (n, h.shape[-1])),
            sq.astype(self.dtype), initial_sq.astype(self.dtype)], axis=-1)
        m = nn.silu(nn.Dense(self.hidden, dtype=self.dtype, name="edge_0")(pair))
        m = nn.silu(nn.Dense(self.hidden, dtype=self.dtype, name="edge_1")(m))
        gate = nn.sigmoid(nn.Dense(1, dtype=self.dtype, name="edge_gate")(m))
        m = m * gate * edge_mask.astype(self.dtype)
        aggregated = jnp.sum(m, axis=2) / self.normalization
        update = nn.silu(nn.Dense(self.hidden, dtype=self.dtype, name="node_0")(
            jnp.concatenate([h, aggregated], axis=-1)))
        h = h + nn.Dense(self.hidden, dtype=self.dtype, name="node_1")(update)
        weight = nn.silu(nn.Dense(self.hidden, dtype=self.dtype, name="coordinate_0")(m))
        weight = jnp.tanh(nn.Dense(1, dtype=self.dtype, kernel_init=_zeros,
                                   name="coordinate_1")(weight)).astype(jnp.float32)
        direction = diff / (jnp.sqrt(sq + 1e-8) + 1.0)
        step = direction * weight * edge_mask * self.coordinate_range
        return h, positions + jnp.sum(step, axis=2) / self.normalization


class EGNN(nn.Module):
    """E(n)-equivariant graph network denoiser (Satorras et al. 2021; Hoogeboom et al. 2022).

    ``EGNN(...)(x, noise_level, labels=None, train=False, node_mask=None)`` on sets [batch, N,
    3 + F] returns [batch, N, 3 + F] (float32): the position channels are the displacement the
    layers give each member (in the zero centre-of-mass subspace, so translation invariant and
    rotation/reflection equivariant), the feature channels an invariant readout; absent members
    get zeros. The noise level and class enter through an embedding added to every member's
    features (invariant inputs keep the symmetry). Positions and distances stay float32 in any
    ``dtype``, so that the symmetry holds to float32 round-off.

    Attributes:
      hidden, depth: features per member and number of :class:`EquivariantBlock` layers.
      normalization: messages are summed over neighbours and divided by this (Hoogeboom et al.
        use a constant, so the sum still counts the neighbours).
      coordinate_range: the largest step one member's coordinate update may take per neighbour.
      num_classes: enables class conditioning; label ``num_classes`` is the null label.
      remat: recompute each block in the backward pass (same parameters and results); the
        edge messages, [batch, N, N, hidden] per block, are most of the activations.
    """

    hidden: int = 128
    depth: int = 4
    normalization: float = 1.0
    coordinate_range: float = 15.0
    num_classes: Optional[int] = None
    noise_scale: float = 1000.0
    remat: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, noise_level, labels=None, train: bool = False, node_mask=None):
        del train  # no dropout
        if x.ndim != 3 or x.shape[-1] < POSITION_DIMS:
            raise ValueError(f"EGNN expects sets [batch, members, 3 + features], got {x.shape}")
        batch, n = x.shape[:2]
        mask = member_mask(x, node_mask)
        x = center_positions(x.astype(jnp.float32), mask)
        positions, features = x[..., :POSITION_DIMS], x[..., POSITION_DIMS:]
        emb = NoiseLevelEmbedding(self.hidden, 64, self.noise_scale, dtype=self.dtype,
                                  name="noise_embedding")(jnp.broadcast_to(noise_level, (batch,)))
        emb = add_class_embedding(emb, labels, self.num_classes, self.dtype, "EGNN")
        h = nn.Dense(self.hidden, dtype=self.dtype, name="embed")(
            jnp.concatenate([features, jnp.ones((batch, n, 1), jnp.float32)], axis=-1)
            .astype(self.dtype))
        h = h + emb[:, None, :]
        edge_mask = (mask[:, :, None] * mask[:, None, :] * (1.0 - jnp.eye(n)))[..., None]
        initial_sq = _pair_geometry(positions)[1]
        moved = positions
        # nn.remat keeps the block names: the parameter tree is the same with remat on or off.
        block_class = nn.remat(EquivariantBlock) if self.remat else EquivariantBlock
        for i in range(self.depth):
            h, moved = block_class(self.hidden, self.normalization, self.coordinate_range,
                                   dtype=self.dtype, name=f"block_{i}")(
                h, moved, edge_mask, initial_sq)
            h = h * mask[..., None].astype(h.dtype)
        out_features = nn.Dense(x.shape[-1] - POSITION_DIMS, dtype=self.dtype, kernel_init=_zeros,
                                name="feature_out")(nn.silu(h)).astype(jnp.float32)
        out = jnp.concatenate([moved - positions, out_features], axis=-1)
        return center_positions(out, mask)
