"""Distances between sample sets.

Sliced Wasserstein on raw points, and, in the space of a feature extractor, the Fréchet distance
(FID when the features are Inception-v3's) and precision/recall."""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["sliced_wasserstein", "FeatureStatistics", "frechet_distance", "precision_recall"]


def sliced_wasserstein(a, b, *, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equally sized point sets [n, dim].

    The root mean over random unit directions of the squared 1-D Wasserstein-2 distance between
    the projections (Rabin et al. 2011), computed by matching sorted projections."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    if a.shape != b.shape:
        raise ValueError(f"point sets must have the same shape, got {a.shape} and {b.shape}")
    directions = np.random.default_rng(seed).standard_normal((a.shape[1], num_projections))
    directions /= np.linalg.norm(directions, axis=0, keepdims=True)
    pa = np.sort(a @ directions, axis=0)
    pb = np.sort(b @ directions, axis=0)
    return float(np.sqrt(np.mean((pa - pb) ** 2)))


class FeatureStatistics:
    """Running mean and covariance of feature vectors, in float64, one batch at a time.

    Batches are merged with Chan et al.'s pairwise update (count, mean, sum of squared
    deviations), which stays accurate where accumulating raw sums of x and x x^T would cancel
    catastrophically. Statistics from different hosts or shards merge the same way
    (:meth:`merge`), and save/load as plain arrays (:meth:`to_arrays`, :meth:`from_arrays`) so a
    dataset's reference statistics can be cached.
    """

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.count = 0
        self.mean = np.zeros(self.dim, np.float64)
        self.m2 = np.zeros((self.dim, self.dim), np.float64)  # sum of (x - mean)(x - mean)^T

    def update(self, features) -> "FeatureStatistics":
        x = np.asarray(features, np.float64).reshape(-1, self.dim)
        if len(x):
            batch = FeatureStatistics(self.dim)
            batch.count = len(x)
            batch.mean = x.mean(axis=0)
            centred = x - batch.mean
            batch.m2 = centred.T @ centred
            self.merge(batch)
        return self

    def merge(self, other: "FeatureStatistics") -> "FeatureStatistics":
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
        if other.count == 0:
            return self
        total = self.count + other.count
        delta = other.mean - self.mean
        self.m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.count * other.count / total)
        self.mean = self.mean + delta * (other.count / total)
        self.count = total
        return self

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased sample covariance (divides by n - 1, as FID implementations do)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, have {self.count}")
        return self.m2 / (self.count - 1)

    def to_arrays(self) -> dict:
        return {"count": np.asarray(self.count), "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_arrays(cls, arrays) -> "FeatureStatistics":
        mean = np.asarray(arrays["mean"], np.float64)
        stats = cls(mean.shape[0])
        stats.count, stats.mean = int(arrays["count"]), mean
        stats.m2 = np.asarray(arrays["m2"], np.float64)
        return stats


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mean1, cov1, mean2=None, cov2=None) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mean1, cov1) and N(mean2, cov2).

    ``|m1 - m2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2))`` (Dowson & Landau 1982; FID of Heusel et al.
    2017 in Inception features). Either pass two :class:`FeatureStatistics` or means and
    covariances.

    ``tr((C1 C2)^(1/2))`` is computed as ``tr((C1^(1/2) C2 C1^(1/2))^(1/2))``, the square root of a
    symmetric positive semi-definite matrix, by eigendecomposition in float64: no complex parts to
    discard and no failure on singular covariances (fewer samples than dimensions).
    """
    if isinstance(mean1, FeatureStatistics) and isinstance(cov1, FeatureStatistics):
        mean1, cov1, mean2, cov2 = mean1.mean, mean1.covariance, cov1.mean, cov1.covariance
    m1, m2 = np.asarray(mean1, np.float64), np.asarray(mean2, np.float64)
    c1, c2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if m1.shape != m2.shape or c1.shape != c2.shape or c1.shape != m1.shape * 2:
        raise ValueError(f"shapes do not match: means {m1.shape}, {m2.shape}; covariances "
                         f"{c1.shape}, {c2.shape}")
    root1 = _psd_sqrt(c1)
    cross = _psd_sqrt(root1 @ c2 @ root1)
    value = np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2) - 2.0 * np.trace(cross)
    return float(max(value, 0.0))


def _knn_radii(features: np.ndarray, k: int, block: int) -> np.ndarray:
    """Distance from each point to its k-th nearest other point of the same set."""
    radii = np.empty(len(features))
    sq = np.sum(features ** 2, axis=1)
    for start in range(0, len(features), block):
        rows = features[start:start + block]
        d2 = np.maximum(sq[start:start + block, None] + sq[None, :] - 2 * rows @ features.T, 0)
        # The k+1-th smallest includes the point itself at distance 0.
        radii[start:start + block] = np.sqrt(np.partition(d2, k, axis=1)[:, k])
    return radii


def _inside_fraction(queries: np.ndarray, support: np.ndarray, radii: np.ndarray,
                     block: int) -> float:
    """Fraction of ``queries`` inside at least one ball (support[j], radii[j])."""
    inside = 0
    sq = np.sum(support ** 2, axis=1)
    for start in range(0, len(queries), block):
        rows = queries[start:start + block]
        d2 = np.maximum(np.sum(rows ** 2, axis=1)[:, None] + sq[None, :] - 2 * rows @ support.T, 0)
        inside += int(np.sum(np.any(d2 <= radii[None, :] ** 2, axis=1)))
    return inside / len(queries)


def precision_recall(real, generated, *, k: int = 3, block: int = 1024,
                     max_points: Optional[int] = None) -> dict:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of generated against real features.

    ``generated`` and ``real`` are feature vectors [n, dim]. Each set's manifold is the union of
    balls around its points reaching their k-th nearest neighbour. Precision is the fraction of
    generated points inside the real manifold (are the samples realistic?); recall the fraction of
    real points inside the generated manifold (is the data's variety covered?). The paper uses k = 3
    and equal set sizes.
    """
    real = np.asarray(real, np.float64).reshape(len(real), -1)
    generated = np.asarray(generated, np.float64).reshape(len(generated), -1)
    if max_points:
        real, generated = real[:max_points], generated[:max_points]
    if real.shape[1] != generated.shape[1]:
        raise ValueError(f"feature sizes differ: {real.shape[1]} and {generated.shape[1]}")
    if min(len(real), len(generated)) <= k:
        raise ValueError(f"each set needs more than k={k} points")
    real_radii = _knn_radii(real, k, block)
    generated_radii = _knn_radii(generated, k, block)
    return {"precision": _inside_fraction(generated, real, real_radii, block),
            "recall": _inside_fraction(real, generated, generated_radii, block)}
