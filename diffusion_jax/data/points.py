"""Procedural 3-D point clouds: points sampled uniformly by area on simple closed surfaces.

Records are ``{"x": float32 [num_points, 3], "label": int32}``: a set of points (their order
carries no meaning) and the index of the surface in SHAPES they were drawn from.

:class:`ShapePoints` is the point-cloud counterpart of the procedural image and video sources:
example i is generated from ``np.random.default_rng([seed, i])``, so the data set is the same
on every machine. Its label is ``i % num_classes`` (balanced classes); its surface gets a random
size (its circumradius r, uniform in RADIUS) and slightly random proportions, points are
drawn uniformly by area on it, the whole set is turned by a uniformly random rotation
(:func:`random_rotation`) and shifted so that the mean of its points is 0. ``geometry(i)`` gives
the ground truth: shape, dimensions, rotation and where the shape's own centre ended up.

Every surface is centred on the origin of its own frame, its axis of symmetry along z, and
scaled so that its furthest point from that origin is at distance r (its circumradius), so the
size of a cloud says nothing about its shape:

- ``sphere``: radius r.
- ``cube``: half side ``half_side`` = r / sqrt(3); every face holds a sixth of the area.
- ``torus``: around the z axis, ``major_radius`` + ``tube`` = r, the tube radius 0.25 to 0.4
  of the major radius; the area density, proportional to the distance from the axis, is met
  by rejection sampling of the tube angle.
- ``cylinder``: ``cylinder_radius`` and ``half_height`` (0.8 to 1.25 of the radius), caps
  included, side and caps in proportion to their areas.
- ``cone``: ``base_radius`` and ``height`` (1.4 to 2.0 base radii), base disc at
  z = -height / 2 and apex at z = +height / 2; lateral surface and base by their areas.
- ``octahedron``: |x| + |y| + |z| = r (eight equal triangular faces).

Centring on the points' mean moves a shape's own centre off the origin (a cone's most), but by
less than r, so a record's points lie within 2 r of the origin (within 1.2 r in practice, unless
the cloud has only a few dozen points).
"""

from __future__ import annotations

import math

import numpy as np

from diffusion_jax.data.sources import DataError, _rng

__all__ = ["SHAPES", "RADIUS", "ShapePoints", "random_rotation"]

SHAPES = ("sphere", "cube", "torus", "cylinder", "cone", "octahedron")
RADIUS = (0.6, 1.0)  # the circumradius r of every shape is uniform in this range


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix drawn uniformly (Haar measure) from SO(3): float64 [3, 3], det +1.

    The QR decomposition of a matrix of standard normals, with the signs of R's diagonal moved
    into Q, is uniform over the orthogonal group O(3); a reflection (det -1) is turned into a
    rotation by negating Q's first column, which maps the uniform measure on one coset onto the
    other. Columns are the images of the x, y and z axes.
    """
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.where(np.diagonal(r) < 0, -1.0, 1.0)
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _disc(rng, n: int, radius: float) -> tuple:
    """``(x, y)`` of n points uniform by area on a disc around the origin."""
    rho = radius * np.sqrt(rng.uniform(size=n))
    theta = rng.uniform(0.0, 2.0 * math.pi, n)
    return rho * np.cos(theta), rho * np.sin(theta)


def _sphere(rng, n: int, dims: dict) -> np.ndarray:
    """Uniform on the sphere: normalised standard normals."""
    p = rng.standard_normal((n, 3))
    return dims["radius"] * p / np.linalg.norm(p, axis=1, keepdims=True)


def _cube(rng, n: int, dims: dict) -> np.ndarray:
    """Uniform on the cube's surface: a face chosen uniformly, then a uniform point on it."""
    half = dims["half_side"]
    p = rng.uniform(-half, half, (n, 3))
    face = rng.integers(0, 6, n)
    p[np.arange(n), face // 2] = np.where(face % 2 == 0, -half, half)
    return p


def _torus(rng, n: int, dims: dict) -> np.ndarray:
    """Uniform on a torus around z: tube angle phi accepted with density (R + tube cos phi)."""
    ring, tube = dims["major_radius"], dims["tube"]
    phis, found = [], 0
    while found < n:  # acceptance is R / (R + tube) > 0.7, so this rarely loops twice
        draw = int(1.5 * (n - found)) + 8
        phi = rng.uniform(0.0, 2.0 * math.pi, draw)
        keep = phi[rng.uniform(0.0, ring + tube, draw) < ring + tube * np.cos(phi)]
        phis.append(keep)
        found += keep.size
    phi = np.concatenate(phis)[:n]
    theta = rng.uniform(0.0, 2.0 * math.pi, n)
    rho = ring + tube * np.cos(phi)
    return np.stack([rho * np.cos(theta), rho * np.sin(theta), tube * np.sin(phi)], 1)


def _cylinder(rng, n: int, dims: dict) -> np.ndarray:
    """Uniform on a closed cylinder: side (area 4 pi a h) and caps (2 pi a^2) by their areas."""
    radius, half_height = dims["cylinder_radius"], dims["half_height"]
    side = rng.uniform(size=n) < 2.0 * half_height / (2.0 * half_height + radius)
    p = np.empty((n, 3))
    k = int(side.sum())
    theta = rng.uniform(0.0, 2.0 * math.pi, k)
    p[side] = np.stack([radius * np.cos(theta), radius * np.sin(theta),
                        rng.uniform(-half_height, half_height, k)], 1)
    x, y = _disc(rng, n - k, radius)
    z = np.where(rng.uniform(size=n - k) < 0.5, -half_height, half_height)
    p[~side] = np.stack([x, y, z], 1)
    return p


def _cone(rng, n: int, dims: dict) -> np.ndarray:
    """Uniform on a closed cone: lateral surface (pi b s, s the slant) and base (pi b^2)."""
    base, height = dims["base_radius"], dims["height"]
    slant = math.hypot(base, height)
    lateral = rng.uniform(size=n) < slant / (slant + base)
    p = np.empty((n, 3))
    k = int(lateral.sum())
    # The lateral area within distance t (as a share of the slant) of the apex grows as t^2.
    t = np.sqrt(rng.uniform(size=k))
    theta = rng.uniform(0.0, 2.0 * math.pi, k)
    p[lateral] = np.stack([t * base * np.cos(theta), t * base * np.sin(theta),
                           height * (0.5 - t)], 1)
    x, y = _disc(rng, n - k, base)
    p[~lateral] = np.stack([x, y, np.full(n - k, -0.5 * height)], 1)
    return p


def _octahedron(rng, n: int, dims: dict) -> np.ndarray:
    """Uniform on |x| + |y| + |z| = r: a face (sign octant) uniformly, Dirichlet(1, 1, 1)."""
    weights = -np.log(1.0 - rng.uniform(size=(n, 3)))  # exponentials; 1 - u avoids log(0)
    weights /= weights.sum(axis=1, keepdims=True)
    signs = np.where(rng.uniform(size=(n, 3)) < 0.5, -1.0, 1.0)
    return dims["radius"] * signs * weights


def _dimensions(label: int, radius: float, aspect: float) -> dict:
    """A shape's lengths from its circumradius r and its proportion (``aspect``, see _ASPECTS)."""
    if label == 1:
        return {"half_side": radius / math.sqrt(3.0)}
    if label == 2:
        return {"major_radius": radius / (1.0 + aspect), "tube": radius * aspect / (1.0 + aspect)}
    if label == 3:
        side = radius / math.hypot(1.0, aspect)
        return {"cylinder_radius": side, "half_height": aspect * side}
    if label == 4:
        base = radius / math.hypot(1.0, 0.5 * aspect)
        return {"base_radius": base, "height": aspect * base}
    return {}


_SAMPLERS = (_sphere, _cube, _torus, _cylinder, _cone, _octahedron)
# Each shape's random proportion: torus tube / major radius, cylinder half height / radius and
# cone height / base radius, uniform in these ranges.
_ASPECTS = (None, None, (0.25, 0.4), (0.8, 1.25), (1.4, 2.0), None)


class ShapePoints:
    """Point clouds of six simple closed surfaces (SHAPES), sampled uniformly by area.

    Example i is generated from ``np.random.default_rng([seed, i])``; its label is
    ``i % len(SHAPES)``. Every cloud is rotated uniformly at random and centred so that the
    mean of its ``num_points`` points is 0. See the module docstring for the surfaces, their
    sizes and proportions.
    """

    SHAPES = SHAPES

    def __init__(self, size: int = 50_000, num_points: int = 128, seed: int = 0):
        if int(size) < 1:
            raise DataError(f"ShapePoints size must be at least 1, got {size}")
        if int(num_points) < 2:
            raise DataError(f"ShapePoints needs at least 2 points per cloud, got "
                            f"num_points={num_points}: set config.data.num_points to 2 or more")
        self.size, self.num_points, self.seed = int(size), int(num_points), int(seed)
        self.num_classes = len(SHAPES)

    def __len__(self):
        return self.size

    def _cloud(self, index) -> dict:
        """Record ``index``'s ground truth (see :meth:`geometry`) with its points under "x"."""
        index = int(index)
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} is out of range for {self!r}")
        index %= self.size
        rng = _rng(self.seed, index)
        label = index % self.num_classes
        radius = float(rng.uniform(*RADIUS))
        aspect = float(rng.uniform(*_ASPECTS[label])) if _ASPECTS[label] else 1.0
        truth = {"shape": SHAPES[label], "label": label, "radius": radius,
                 **_dimensions(label, radius, aspect)}
        rotation = random_rotation(rng)
        points = _SAMPLERS[label](rng, self.num_points, truth) @ rotation.T
        centre = -points.mean(axis=0)
        x = (points + centre).astype(np.float32)
        x -= x.mean(axis=0, dtype=np.float64).astype(np.float32)  # float32 rounding too
        return {"x": x, **truth, "rotation": rotation, "centre": centre}

    def geometry(self, index) -> dict:
        """The ground truth of record ``index``.

        ``{"shape"`` (a name of SHAPES), ``"label"`` (its index), ``"radius"`` (r, the
        circumradius), the shape's own lengths (``"half_side"`` of a cube; ``"major_radius"``
        and ``"tube"`` of a torus; ``"cylinder_radius"`` and ``"half_height"`` of a cylinder;
        ``"base_radius"`` and ``"height"`` of a cone; see the module docstring),
        ``"rotation"`` (float64 [3, 3]) and ``"centre"`` (float64 [3]), the position of the
        shape's own centre in the record's coordinates}. A record point x is the point
        ``(x - centre) @ rotation`` of the shape in its own frame (up to float32 rounding).
        """
        cloud = self._cloud(index)
        del cloud["x"]
        return cloud

    def __getitem__(self, index):
        cloud = self._cloud(index)
        return {"x": cloud["x"], "label": np.int32(cloud["label"])}

    def __repr__(self):
        return f"ShapePoints(size={self.size}, num_points={self.num_points}, seed={self.seed})"
