"""Inpainting inside the samplers: the known region (Lugmayr et al. 2022) and RePaint's jumps.

:class:`KnownRegion` is what :func:`diffusion_jax.samplers.sample` keeps (``known=``);
:func:`jump_schedule` the order of steps and jumps back with resampling; :func:`renoise` one jump
back up the grid. Re-exported by :mod:`diffusion_jax.samplers`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["KnownRegion", "jump_schedule", "renoise", "check_known"]


class KnownRegion(NamedTuple):
    """The part of the sample that is given: what inpainting keeps (Lugmayr et al. 2022).

    After every step to time t' the sampler puts ``keep * (alpha(t') x0 + sigma(t') z) + (1 -
    keep) * x`` in place of its state x, and after the last step ``keep * x0 + (1 - keep) * x``,
    so where ``keep`` is 1 the output is ``x0`` exactly.

    x0: the clean data in the sampler's space (pixels, or latents), shaped like the noise.
    keep: 1 where ``x0`` is kept, 0 where the sampler paints; broadcastable to ``x0``
        (e.g. [batch, height, width, 1]); values in between blend.
    noise: the standard normal z of the known region's forward-noised copies. None draws it
        afresh at every step (RePaint; then ``sample`` needs ``key``); an array (e.g. the
        sampler's initial noise, as diffusers' inpainting pipelines do) uses it at every step.
    """

    x0: jax.Array
    keep: jax.Array
    noise: Optional[jax.Array] = None


def check_known(known: KnownRegion, noise) -> KnownRegion:
    """The known region as arrays, with shapes checked against the noise."""
    if not isinstance(known, KnownRegion):
        raise ValueError(f"known must be a samplers.KnownRegion, got {type(known).__name__}")
    x0, keep = jnp.asarray(known.x0), jnp.asarray(known.keep)
    if x0.shape != noise.shape:
        raise ValueError(f"known.x0 has shape {x0.shape}; it must be shaped like the noise "
                         f"{noise.shape}")
    try:
        jnp.broadcast_shapes(keep.shape, x0.shape)
    except ValueError:
        raise ValueError(f"known.keep of shape {keep.shape} does not broadcast to the data's "
                         f"shape {x0.shape}") from None
    fixed = None
    if known.noise is not None:
        fixed = jnp.asarray(known.noise)
        if fixed.shape != noise.shape:
            raise ValueError(f"known.noise has shape {fixed.shape}; it must be shaped like the "
                             f"noise {noise.shape}")
    return KnownRegion(x0, keep, fixed)


def jump_schedule(num_steps: int, jump_length: int, jump_n_sample: int) -> np.ndarray:
    """RePaint's resampling schedule (Lugmayr et al. 2022, Sec. 4.2) as ops [from, to] on the grid.

    Step i goes from grid index i to i + 1. After a step that leaves r > 0 steps to go, with r a
    multiple of ``jump_length`` and at least ``jump_length`` steps done, the state is
    forward-noised back ``jump_length`` indices and those steps are run again, until the stretch
    has been run ``jump_n_sample`` times in all; then sampling goes on down the grid. With
    ``jump_n_sample = 1`` this is the plain grid, one op per step."""
    if int(jump_length) != jump_length or jump_length < 1:
        raise ValueError(f"jump_length must be a positive integer, got {jump_length!r}")
    if int(jump_n_sample) != jump_n_sample or jump_n_sample < 1:
        raise ValueError(f"jump_n_sample must be a positive integer (1: no resampling), got "
                         f"{jump_n_sample!r}")
    ops, index, left = [], 0, {}
    while index < num_steps:
        ops.append((index, index + 1))
        index += 1
        remaining = num_steps - index
        if jump_n_sample > 1 and remaining > 0 and remaining % jump_length == 0 \
                and index >= jump_length:
            left.setdefault(index, jump_n_sample - 1)
            if left[index] > 0:
                left[index] -= 1
                ops.append((index, index - jump_length))
                index -= jump_length
    return np.asarray(ops, np.int32).reshape(-1, 2)


def renoise(x, s, z):
    """Forward-noise the state from the op's start (less noise) to its end (more noise).

    q(x_a | x_b) of the schedule: x_a = (alpha_a / alpha_b) x_b + sigma_a sqrt(1 - e^(lambda_a -
    lambda_b)) z, the jump back of RePaint (Lugmayr et al. 2022, Algorithm 1, line 9 over several
    steps at once)."""
    ratio = s["alpha_next"] / s["alpha"]
    fresh = jnp.sqrt(-jnp.expm1(s["logsnr_next"] - s["logsnr"]))
    return ratio * x + s["sigma_next"] * fresh * z
