"""Runs on sets of points (point clouds, molecules): masks, centred noise and member counts.

A set example is [members, 3 + features]: positions, then invariant features (a molecule's
scaled one-hot atom types). Molecules vary in size, so their batches carry a ``node_mask``
[batch, members] (1 for atoms, 0 for padding); point clouds have a fixed number of points and
no mask. Equivariant diffusion keeps positions in the zero centre-of-mass subspace (Hoogeboom
et al. 2022, section 3.2), and every piece here keeps to it without changing the samplers:

* training draws its noise there (the loss's ``project``) and averages the loss over present
  members only (its ``mask_key``);
* generation draws each sample's atom count from the training data's counts, starts from noise
  projected there, and wraps the denoiser so that its clean-data estimate is projected too. A
  sampler's updates are linear in ``x_t``, that estimate and fresh noise, so the projected part
  of its state is the same as if every draw had been projected (the set networks read only
  centred positions of present members), and the rest decays with the noise level and is
  projected away at the end.

Generated sets mark absent members by all-zero rows
(:func:`diffusion_jax.set_files.present`): a projected present member always has a nonzero
feature or position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import modalities
from diffusion_jax.models.egnn import center_positions

__all__ = ["SET_KINDS", "is_set_data", "has_masks", "loss_options", "project",
           "member_counts", "SetSampling"]

SET_KINDS = modalities.SET_KINDS
MASK_KEY = "node_mask"


def is_set_data(config) -> bool:
    """Whether ``config.data.name``'s examples are sets of points (point clouds, molecules)."""
    return modalities.KINDS.get(config.data.name) in SET_KINDS


def has_masks(config) -> bool:
    """Whether the run's sets vary in size (molecules), so that batches carry a ``node_mask``."""
    return modalities.KINDS.get(config.data.name) == "molecules"


def project(x, node_mask=None):
    """``x`` projected onto the zero centre-of-mass subspace, absent members zeroed."""
    return center_positions(x, node_mask)


def loss_options(config) -> dict:
    """The loss's ``mask_key`` and noise ``project`` for set data; nothing for other data."""
    if not is_set_data(config):
        return {}
    return {"mask_key": MASK_KEY, "project": project}


_COUNTS: dict = {}  # data config (JSON) -> (counts, probabilities)


def member_counts(config, build_source) -> tuple:
    """``(counts, probabilities)``: the sizes of the training sets and how often each occurs.

    ``build_source()`` builds the run's training source, which must have ``atom_counts()``;
    read once per data config and kept."""
    key = config.data.to_json_best_effort()
    if key not in _COUNTS:
        counts = np.asarray(build_source().atom_counts())
        values, frequency = np.unique(counts, return_counts=True)
        _COUNTS[key] = (values.astype(np.int32), (frequency / frequency.sum()).astype(np.float32))
    return _COUNTS[key]


def _projected(denoise, x, t, cond):
    mask = cond.get(MASK_KEY) if isinstance(cond, dict) else None
    return project(denoise(x, t, cond), mask)


class SetSampling:
    """What generation does differently for sets: member masks, projected noise and denoiser."""

    def __init__(self, config, example_shape, build_source):
        self.members = int(example_shape[0])
        self.counts = None
        if has_masks(config):
            counts, probabilities = member_counts(config, build_source)
            if counts.max() > self.members:
                raise ValueError(f"the training data has sets of {counts.max()} members; the "
                                 f"model takes at most {self.members}")
            self.counts = (jnp.asarray(counts), jnp.asarray(probabilities))

    def masks(self, key, num):
        """float32 [num, members] masks of sizes drawn from the training data's, or None."""
        if self.counts is None:
            return None
        counts, probabilities = self.counts
        drawn = jax.random.choice(key, counts, (num,), p=probabilities)
        return (jnp.arange(self.members)[None, :] < drawn[:, None]).astype(jnp.float32)

    def prepare(self, key, num, cond, uncond):
        """``(key, masks, cond, uncond)`` with each sample's members drawn and added.

        The masks are drawn with part of ``key`` (None, and ``key`` untouched, for sets of one
        size); the key returned is the rest, for the remainder of generation."""
        if self.counts is None:
            return key, None, cond, uncond
        key, key_members = jax.random.split(key)
        masks = self.masks(key_members, num)
        return (key, masks) + self.conditions(cond, uncond, masks)

    def conditions(self, cond, uncond, masks):
        """``cond`` and ``uncond`` with the masks added (both branches see the same sets)."""
        if masks is None:
            return cond, uncond
        if cond is None:
            return {MASK_KEY: masks}, None
        cond = {**cond, MASK_KEY: masks}
        return cond, None if uncond is None else {**uncond, MASK_KEY: masks}

    @staticmethod
    def denoiser(denoise):
        """``denoise(x, t, cond)`` whose clean-data estimate is projected (its cond's mask)."""
        return jax.tree_util.Partial(_projected, denoise)
