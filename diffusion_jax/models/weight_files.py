"""Weights files of the pretrained feature networks (FID's Inception, LPIPS' VGG): npz and torch.

Both networks are filled from PyTorch state dicts once and then kept as ``.npz`` files, read
with ``allow_pickle=False`` and checked entry by entry against the network's variables.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

__all__ = ["to_numpy", "place_tensors", "save_npz", "load_npz"]


def to_numpy(value) -> np.ndarray:
    """A torch tensor (any float precision) or array as a float32 numpy array."""
    if hasattr(value, "detach"):  # a torch tensor (float() also covers half-precision files)
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def place_tensors(tensors: Mapping[str, tuple[Any, tuple]], shapes: Mapping[tuple, tuple]
                  ) -> dict:
    """Flax variables from ``{torch name: (tensor, variable path)}``, kernels OIHW -> HWIO.

    Every shape is checked against ``shapes`` (the variables' flattened shapes); a mismatch
    raises ``ValueError`` naming each wrong entry.
    """
    flat, bad_shapes = {}, []
    for key, (value, path) in tensors.items():
        value = to_numpy(value)
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        if value.shape != tuple(shapes[path]):
            bad_shapes.append(f"{key}: got {value.shape} (after transposing), "
                              f"expected {tuple(shapes[path])}")
            continue
        flat[path] = jnp.asarray(value)
    if bad_shapes:
        raise ValueError("state dict entries with the wrong shape: " + "; ".join(bad_shapes))
    return unflatten_dict(flat)


def save_npz(variables: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``variables`` to an ``.npz`` file that :func:`load_npz` reads without PyTorch."""
    arrays = {"/".join(k): np.asarray(v, dtype=np.float32)
              for k, v in flatten_dict(dict(variables)).items()}
    with open(path, "wb") as f:  # a file object keeps numpy from appending '.npz' to the name
        np.savez(f, **arrays)


def load_npz(path: str, shapes: Mapping[tuple, tuple], what: str) -> dict:
    """The variables in an ``.npz`` of :func:`save_npz`, checked against ``shapes`` (of ``what``)."""
    with np.load(path, allow_pickle=False) as data:
        given = {tuple(name.split("/")): data[name] for name in data.files}
    missing = sorted("/".join(p) for p in set(shapes) - set(given))
    unexpected = sorted("/".join(p) for p in set(given) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"{path} does not hold {what} variables: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    bad = [f"{'/'.join(p)}: got {given[p].shape}, expected {tuple(s)}"
           for p, s in shapes.items() if given[p].shape != tuple(s)]
    if bad:
        raise ValueError(f"{path} has entries with the wrong shape: " + "; ".join(bad))
    return unflatten_dict({p: jnp.asarray(v, dtype=jnp.float32) for p, v in given.items()})
