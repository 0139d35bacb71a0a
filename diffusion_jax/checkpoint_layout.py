"""What a checkpoint holds of a train state: the five fields every checkpoint has had.

A train state is saved as :class:`Saved` (step, parameters, EMA, optimizer state, key) and
restored into the caller's type, so an adapter run's frozen base (read again from where it came
from on resuming) and its static ``compose`` never enter a checkpoint, and checkpoints written
before they existed keep restoring. Used by :mod:`diffusion_jax.checkpoints`.
"""

from __future__ import annotations

from typing import Any

import flax.struct

__all__ = ["Saved", "saved_part", "restored_as"]


@flax.struct.dataclass
class Saved:
    """What a checkpoint holds of a train state: the fields every checkpoint has had.

    An adapter run's frozen base (read again from where it came from on resuming) and its
    static ``compose`` are left out, so checkpoints keep one layout, older ones included."""

    step: Any
    params: Any
    ema_params: Any
    opt_state: Any
    rng: Any


SAVED_FIELDS = ("step", "params", "ema_params", "opt_state", "rng")


def saved_part(state):
    """A train state as :class:`Saved`; any other tree as it is."""
    if hasattr(state, "frozen") and all(hasattr(state, f) for f in SAVED_FIELDS):
        return Saved(**{f: getattr(state, f) for f in SAVED_FIELDS})
    return state


def restored_as(abstract_state, restored):
    """The restored :class:`Saved` fields in the caller's train state type (no frozen base)."""
    if isinstance(restored, Saved):
        fields = {f: getattr(restored, f) for f in SAVED_FIELDS}
        return abstract_state.replace(frozen=None, **fields)
    return restored
