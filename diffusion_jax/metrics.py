"""Distances between sample sets that need no trained feature extractor."""

from __future__ import annotations

import numpy as np

__all__ = ["sliced_wasserstein"]


def sliced_wasserstein(a, b, *, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equally sized point sets [n, dim]: the root mean
    over random unit directions of the squared 1-D Wasserstein-2 distance between the projections
    (Rabin et al. 2011), computed by matching sorted projections."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    if a.shape != b.shape:
        raise ValueError(f"point sets must have the same shape, got {a.shape} and {b.shape}")
    directions = np.random.default_rng(seed).standard_normal((a.shape[1], num_projections))
    directions /= np.linalg.norm(directions, axis=0, keepdims=True)
    pa = np.sort(a @ directions, axis=0)
    pb = np.sort(b @ directions, axis=0)
    return float(np.sqrt(np.mean((pa - pb) ** 2)))
