"""Point clouds: set distances (Chamfer, EMD), the metrics built on them, PLY files and renders.

Distances between two point sets ``a`` [n, 3] and ``b`` [m, 3]:

- :func:`chamfer`: the mean over a of the squared distance to the nearest point of b plus the
  mean over b of the squared distance to the nearest point of a (squared distances, the sum of
  both directions' means: the convention of PointFlow and of Luo & Hu 2021's evaluation).
  :func:`pairwise_chamfer` computes it for every pair of two batches with a jitted JAX kernel,
  in blocks of bounded memory.
- :func:`emd`: the earth mover's distance of two sets of equal size, the mean Euclidean (not
  squared) distance between matched points under the optimal one-to-one matching, solved
  exactly by ``scipy.optimize.linear_sum_assignment`` (cubic in the number of points, so slow
  for thousands of points; :func:`pairwise_emd` solves the pairs on a pool of threads).

:func:`set_distances` scores a batch of generated sets against reference sets with these two
distances: minimum matching distance (MMD) and coverage (COV) of Achlioptas et al. 2018,
"Learning Representations and Generative Models for 3D Point Clouds", and the 1-nearest-
neighbour accuracy (1-NNA) of Yang et al. 2019, "PointFlow". Clouds are compared as given:
normalise them first (as the papers do, e.g. to the reference's scale) where that matters.

:func:`write_ply` and :func:`read_ply` write and read ASCII PLY files (points, with optional
colours); :func:`render_points`, :func:`render_molecule` and :func:`render_grid` draw point
clouds and molecules as uint8 RGB images with matplotlib (Agg, off screen), an optional
dependency like SciPy: ``pip install -e ".[points]"``.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.data.sources import DataError
from diffusion_jax.files import atomic_write

__all__ = ["chamfer", "pairwise_chamfer", "emd", "pairwise_emd", "set_distances", "write_ply",
           "read_ply", "render_points", "render_molecule", "render_grid"]

_INSTALL = 'pip install -e ".[points]"` (or `pip install scipy matplotlib`)'
# pairwise_chamfer's blocks hold at most this many squared distances (float32) at once.
_BLOCK_ELEMENTS = 1 << 22


def _scipy():
    """``(linear_sum_assignment, cdist)`` of SciPy, or a RuntimeError saying how to install it."""
    try:
        from scipy.optimize import linear_sum_assignment
        from scipy.spatial.distance import cdist
    except ImportError as err:
        raise RuntimeError(f"the earth mover's distance needs SciPy: `{_INSTALL}") from err
    return linear_sum_assignment, cdist


def _points(name: str, value, batched: bool = False) -> np.ndarray:
    """``value`` as float64 [n, 3] (or [batch, n, 3]), or a ValueError naming ``name``."""
    array = np.asarray(value, np.float64)
    rank = 3 if batched else 2
    if array.ndim != rank or array.shape[-1] != 3 or 0 in array.shape:
        expected = "[sets, points, 3]" if batched else "[points, 3]"
        raise ValueError(f"{name} must be a non-empty array of shape {expected}, got shape "
                         f"{array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite coordinates")
    return array


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[n, m]`` squared Euclidean distances between the rows of a and b (float64)."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def chamfer(a, b) -> float:
    """The Chamfer distance of point sets a [n, 3] and b [m, 3] (squared distances).

    ``mean_i min_j |a_i - b_j|^2 + mean_j min_i |a_i - b_j|^2``: symmetric, 0 for a set and
    itself, computed exactly in float64.
    """
    d = _squared_distances(_points("a", a), _points("b", b))
    return float(d.min(1).mean() + d.min(0).mean())


def _augmented(x, left: bool):
    """Rows [x, |x|^2, 1] (left) or [-2x, 1, |x|^2]: their products are squared distances."""
    sq = jnp.sum(x * x, -1, keepdims=True)
    one = jnp.ones_like(sq)
    return jnp.concatenate([x, sq, one] if left else [-2.0 * x, one, sq], -1)


@jax.jit
def _chamfer_block(a, b):
    """Chamfer distances [p, q] between every set of a [p, n, 3] and of b [q, m, 3]."""
    (p, n, _), (q, m, _) = a.shape, b.shape
    d = _augmented(a, True).reshape(p * n, 5) @ _augmented(b, False).reshape(q * m, 5).T
    d = d.reshape(p, n, q, m)
    return jnp.maximum(d.min(3), 0.0).mean(1) + jnp.maximum(d.min(1), 0.0).mean(2)


def _padded(sets: np.ndarray, multiple: int) -> np.ndarray:
    """``sets`` with copies of its first set appended up to a multiple of ``multiple`` sets."""
    extra = -len(sets) % multiple
    return np.concatenate([sets, np.repeat(sets[:1], extra, 0)]) if extra else sets


def pairwise_chamfer(A, B=None) -> np.ndarray:
    """Chamfer distances (see :func:`chamfer`) of every pair of A [p, n, 3] and B [q, m, 3].

    Returns float64 [p, q]; without B, A against itself. The work runs on JAX's default device
    in float32, in blocks of whole sets that hold at most a few million squared distances at
    once (padded to one block shape, so one call compiles once); each distance is
    |a|^2 + |b|^2 - 2 a.b, whose float32 rounding is about 1e-7 times the squared size of the
    clouds.
    """
    A = _points("A", A, batched=True).astype(np.float32)
    B = A if B is None else _points("B", B, batched=True).astype(np.float32)
    (p, n, _), (q, m, _) = A.shape, B.shape
    cols = min(q, max(1, _BLOCK_ELEMENTS // (n * m)))
    rows = min(p, max(1, _BLOCK_ELEMENTS // (n * m * cols)))
    A, B = _padded(A, rows), _padded(B, cols)
    out = np.empty((len(A), len(B)))
    for i in range(0, len(A), rows):
        for j in range(0, len(B), cols):
            out[i:i + rows, j:j + cols] = np.asarray(_chamfer_block(A[i:i + rows], B[j:j + cols]))
    return out[:p, :q]


def emd(a, b) -> float:
    """The earth mover's distance of two equal-sized point sets a and b [n, 3].

    The mean Euclidean (not squared) distance between matched points under the one-to-one
    matching that minimises it, found exactly by ``scipy.optimize.linear_sum_assignment``.
    """
    a, b = _points("a", a), _points("b", b)
    if len(a) != len(b):
        raise ValueError(f"the earth mover's distance matches points one to one, so both sets "
                         f"need as many points: got {len(a)} and {len(b)}; subsample the larger")
    linear_sum_assignment, cdist = _scipy()
    cost = cdist(a, b)
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def pairwise_emd(A, B=None) -> np.ndarray:
    """Earth mover's distances (see :func:`emd`) of every pair of A [p, n, 3] and B [q, n, 3].

    Returns float64 [p, q]; without B, A against itself (each pair solved once, the diagonal
    0). The assignment problems are solved on a pool of threads, one per CPU core.
    """
    A = _points("A", A, batched=True)
    same = B is None
    B = A if same else _points("B", B, batched=True)
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"the earth mover's distance matches points one to one, so all sets "
                         f"need as many points: A's have {A.shape[1]}, B's {B.shape[1]}")
    pairs = [(i, j) for i in range(len(A)) for j in range(i + 1 if same else 0, len(B))]
    out = np.zeros((len(A), len(B)))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for (i, j), value in zip(pairs, pool.map(lambda ij: emd(A[ij[0]], B[ij[1]]), pairs)):
            out[i, j] = value
    return out + out.T if same else out


def _one_nna(d_gg: np.ndarray, d_rr: np.ndarray, d_gr: np.ndarray) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy over generated + reference sets."""
    g, r = d_gr.shape
    d = np.block([[d_gg, d_gr], [d_gr.T, d_rr]]).astype(np.float64)
    np.fill_diagonal(d, np.inf)
    labels = np.r_[np.zeros(g, bool), np.ones(r, bool)]
    return float((labels[d.argmin(1)] == labels).mean())


_DISTANCES = {"chamfer": pairwise_chamfer, "emd": pairwise_emd}


def set_distances(generated, reference, metrics=("chamfer", "emd")) -> dict:
    """MMD, COV and 1-NNA of generated point sets against reference sets, per set distance.

    ``generated`` [g, n, 3] and ``reference`` [r, m, 3] (n = m for EMD); ``metrics`` names the
    distances, of "chamfer" and "emd". For each distance D the result holds:

    - ``{D}_mmd``, minimum matching distance (Achlioptas et al. 2018): for each reference set
      the distance to its nearest generated set, averaged over the reference; lower is better.
    - ``{D}_cov``, coverage (Achlioptas et al. 2018): the share of reference sets that are the
      nearest reference set of at least one generated set; higher is better.
    - ``{D}_1nna``, 1-nearest-neighbour accuracy (Yang et al. 2019, PointFlow): the accuracy
      of the leave-one-out 1-NN classifier telling generated from reference sets over their
      union; 0.5 is ideal, 1.0 means the two are told apart perfectly (and a model that
      copies the reference scores below 0.5).
    """
    generated = _points("generated", generated, batched=True)
    reference = _points("reference", reference, batched=True)
    unknown = [name for name in metrics if name not in _DISTANCES]
    if unknown:
        raise ValueError(f"unknown set distances {unknown}; choose from {sorted(_DISTANCES)}")
    result = {}
    for name in metrics:
        pairwise = _DISTANCES[name]
        d_gr = pairwise(generated, reference)
        result[f"{name}_mmd"] = float(d_gr.min(0).mean())
        result[f"{name}_cov"] = len(np.unique(d_gr.argmin(1))) / len(reference)
        result[f"{name}_1nna"] = _one_nna(pairwise(generated), pairwise(reference), d_gr)
    return result


def write_ply(path: str, points, colors=None) -> None:
    """Write points [n, 3] (and uint8 colours [n, 3]) as an ASCII PLY file, atomically.

    Vertices have float properties x, y, z (written with 9 significant digits, so float32
    values read back exactly) and, with ``colors``, uchar red, green, blue.
    """
    points = np.asarray(points, np.float32)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"write_ply needs points of shape [n, 3], got {points.shape}")
    header = ["ply", "format ascii 1.0", "comment written by diffusion_jax",
              f"element vertex {len(points)}", "property float x", "property float y",
              "property float z"]
    rows = [" ".join(f"{v:.9g}" for v in p) for p in points.tolist()]
    if colors is not None:
        colors = np.asarray(colors)
        if colors.shape != points.shape or colors.dtype != np.uint8:
            raise ValueError(f"write_ply needs colours as uint8 [{len(points)}, 3], got "
                             f"{colors.dtype} {colors.shape}")
        header += ["property uchar red", "property uchar green", "property uchar blue"]
        rows = [f"{row} {r} {g} {b}" for row, (r, g, b) in zip(rows, colors.tolist())]
    text = "\n".join(header + ["end_header"] + rows) + "\n"

    def write(tmp):
        with open(tmp, "w", encoding="ascii") as f:
            f.write(text)
    atomic_write(path, write)


def _ply_header(path: str, lines: list) -> tuple:
    """``(vertex count, vertex property names, header length)`` of a PLY file's lines."""
    def bad(reason):
        return DataError(f"{path} is not a PLY file this reader understands: {reason}")
    if not lines or lines[0].strip() != "ply":
        raise bad("it does not start with the line 'ply'")
    if "end_header" not in (line.strip() for line in lines):
        raise bad("it has no 'end_header' line")
    end = [line.strip() for line in lines].index("end_header")
    count, names, element = None, [], None
    for line in lines[1:end]:
        words = line.split()
        if words[:1] == ["format"] and words[1:2] != ["ascii"]:
            raise bad(f"its format is {' '.join(words[1:])}; only ASCII PLY files are read "
                      "(convert it, e.g. with Open3D or MeshLab)")
        if words[:1] == ["element"]:
            if count is None and element is not None:
                raise bad("the vertex element must come first")
            element = words[1] if len(words) == 3 else "?"
            if element == "vertex":
                count = int(words[2]) if words[2].isdigit() else None
        elif words[:1] == ["property"] and element == "vertex":
            if len(words) < 3 or words[1] == "list":
                raise bad(f"its vertex property line {line.strip()!r} is not '<type> <name>'")
            names.append(words[-1])
    if count is None:
        raise bad("it declares no 'element vertex <count>'")
    if not {"x", "y", "z"} <= set(names):
        raise bad(f"its vertices have properties {names}, without all of x, y and z")
    return count, names, end + 1


def read_ply(path: str) -> tuple:
    """Read an ASCII PLY file's vertices: ``(points float32 [n, 3], colours uint8 [n, 3] or None)``.

    Colours are returned when the vertices have red, green and blue properties; any elements
    after the vertices (faces) are ignored. A file this reader cannot parse raises
    :class:`~diffusion_jax.data.sources.DataError` naming it.
    """
    try:
        with open(path, encoding="ascii") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not an ASCII PLY file (binary PLY is not read): {err}") from err
    count, names, start = _ply_header(path, lines)
    rows = [line.split() for line in lines[start:start + count]]
    short = [start + k + 1 for k, row in enumerate(rows) if len(row) < len(names)]
    if len(rows) < count or short:
        where = (f"line {short[0]} holds fewer values" if short
                 else f"only {len(rows)} vertex lines follow")
        raise DataError(f"{path} declares {count} vertices of {len(names)} properties, but "
                        f"{where} (the file may be cut short)")
    try:
        values = np.array([[float(v) for v in row[:len(names)]] for row in rows]).reshape(
            count, len(names))
    except ValueError as err:
        raise DataError(f"{path} has a vertex line that is not numbers: {err}") from err
    points = values[:, [names.index(k) for k in "xyz"]].astype(np.float32)
    colours = None
    if {"red", "green", "blue"} <= set(names):
        colours = values[:, [names.index(k) for k in ("red", "green", "blue")]]
        colours = np.clip(colours, 0, 255).astype(np.uint8)
    return points, colours


# Renders. Points are projected orthographically onto the screen of a camera placed as
# matplotlib's 3-D axes place theirs (``elev`` degrees above the x-y plane, ``azim`` degrees
# around z from the x axis) and drawn far to near on 2-D axes, so nearer points and atoms always
# cover farther ones.
_RENDER_LOCK = threading.Lock()
_CANVASES = {}  # size -> (figure, canvas, axes), reused between renders
_POINT_COLOUR = np.array([0.17, 0.40, 0.75])  # points without colours of their own
_DEPTH_SHADE = (0.45, 1.0)  # brightness of the farthest and the nearest point


def _matplotlib():
    """``(Figure, FigureCanvasAgg)`` of matplotlib, or a RuntimeError saying how to install it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise RuntimeError(f"rendering point clouds and molecules needs matplotlib: "
                           f"`{_INSTALL}") from err
    return Figure, FigureCanvasAgg


def _camera(elev: float, azim: float) -> np.ndarray:
    """Rows: the screen's right, up and towards-the-viewer directions, in world coordinates."""
    e, a = math.radians(elev), math.radians(azim)
    return np.array([[-math.sin(a), math.cos(a), 0.0],
                     [-math.sin(e) * math.cos(a), -math.sin(e) * math.sin(a), math.cos(e)],
                     [math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)]])


def _axes(size: int):
    """A cleared white ``size`` x ``size`` pixel figure's (canvas, axes), reused per size."""
    if size not in _CANVASES:
        Figure, FigureCanvasAgg = _matplotlib()
        figure = Figure(figsize=(1.0, 1.0), dpi=size, facecolor="white")
        canvas = FigureCanvasAgg(figure)
        axes = figure.add_axes((0.0, 0.0, 1.0, 1.0))
        _CANVASES[size] = (figure, canvas, axes)
    _, canvas, axes = _CANVASES[size]
    axes.clear()
    axes.set_axis_off()
    axes.set_facecolor("white")
    return canvas, axes


def _pixels(canvas, axes, half_width: float, size: int) -> np.ndarray:
    """Draw the axes over [-half_width, half_width]^2 and return uint8 [size, size, 3]."""
    axes.set_xlim(-half_width, half_width)
    axes.set_ylim(-half_width, half_width)
    axes.set_aspect("equal", adjustable="box")
    canvas.draw()
    return np.array(canvas.buffer_rgba())[:size, :size, :3]


def _check_size(size) -> int:
    """``size`` as an int of at least 16, or a ValueError."""
    if int(size) != size or size < 16:
        raise ValueError(f"render size must be a whole number of pixels, at least 16; got {size}")
    return int(size)


def _project(points: np.ndarray, elev: float, azim: float) -> tuple:
    """``(screen xy [n, 2], depth [n], far-to-near order, radius)`` of points on the screen.

    Screen coordinates are centred on the picture's bounding box, depth on the 3-D bounding
    box's centre; ``radius`` is the cloud's largest distance from that centre.
    """
    centred = points - (points.max(0) + points.min(0)) / 2.0
    screen = centred @ _camera(elev, azim).T
    xy = screen[:, :2] - (screen[:, :2].max(0) + screen[:, :2].min(0)) / 2.0
    radius = float(np.linalg.norm(centred, axis=1).max()) or 1.0
    return xy, screen[:, 2], np.argsort(screen[:, 2], kind="stable"), radius


def _shade(depth: np.ndarray, radius: float) -> np.ndarray:
    """Brightness per point: _DEPTH_SHADE's far value at depth -radius, near at +radius."""
    far, near = _DEPTH_SHADE
    return far + (near - far) * np.clip((depth / radius + 1.0) / 2.0, 0.0, 1.0)


def _rgb(colors, n: int) -> np.ndarray:
    """Colours as floats in [0, 1], [n, 3]: uint8 [n, 3] or floats in [0, 1], or the default."""
    if colors is None:
        return np.broadcast_to(_POINT_COLOUR, (n, 3))
    colors = np.asarray(colors)
    if colors.shape != (n, 3):
        raise ValueError(f"colours must be of shape [{n}, 3] (one RGB colour per point), got "
                         f"{colors.shape}")
    return colors / 255.0 if colors.dtype == np.uint8 else np.clip(colors, 0.0, 1.0)


def render_points(points, *, colors=None, size: int = 128, elev: float = 20.0,
                  azim: float = 30.0, extent: Optional[float] = None) -> np.ndarray:
    """A picture of a point cloud [n, 3]: uint8 [size, size, 3], white background.

    The camera looks from ``elev`` degrees above the x-y plane and ``azim`` degrees around the
    z axis (matplotlib's 3-D view angles), projecting orthographically with equal scale on
    every axis and no axes drawn, the picture centred on the projected cloud. The view is
    ``extent`` data units from the centre to each side; by default a little more than the
    radius of the cloud's bounding sphere, so it does not zoom with the rotation (give one
    ``extent`` to compare the sizes of several clouds). Points are dots drawn far to near,
    darker the farther they are; ``colors`` (uint8 or [0, 1] floats, [n, 3]) replaces their
    blue.
    """
    points = _points("points", points)
    size = _check_size(size)
    xy, depth, order, radius = _project(points, elev, azim)
    rgb = _rgb(colors, len(points)) * _shade(depth, radius)[:, None]
    # Dots about 1/40 of the picture wide, smaller for dense clouds; scatter sizes are in
    # points^2 and this figure has ``size`` dots per inch.
    diameter = size / 40.0 * min(1.5, max(0.5, math.sqrt(256.0 / len(points))))
    with _RENDER_LOCK:
        canvas, axes = _axes(size)
        axes.scatter(xy[order, 0], xy[order, 1], s=(diameter * 72.0 / size) ** 2, c=rgb[order],
                     linewidths=0, marker="o")
        return _pixels(canvas, axes, float(extent or 1.08 * radius), size)


# CPK-like colours and ball radii (in Angstrom, for a ball-and-stick picture) per element.
_ELEMENTS = {
    "H": ((0.92, 0.92, 0.92), 0.25), "C": ((0.30, 0.30, 0.30), 0.38),
    "N": ((0.19, 0.31, 0.97), 0.36), "O": ((0.90, 0.10, 0.10), 0.36),
    "F": ((0.30, 0.80, 0.25), 0.34), "Cl": ((0.12, 0.75, 0.12), 0.42),
    "Br": ((0.60, 0.13, 0.0), 0.45), "I": ((0.45, 0.0, 0.6), 0.48),
    "S": ((0.95, 0.85, 0.20), 0.42), "P": ((1.0, 0.50, 0.0), 0.42),
    "B": ((1.0, 0.71, 0.71), 0.36), "Si": ((0.85, 0.65, 0.45), 0.45),
}
_OTHER_ELEMENT = ((1.0, 0.45, 0.75), 0.40)  # pink
_ATOMIC_SYMBOLS = {1: "H", 5: "B", 6: "C", 7: "N", 8: "O", 9: "F", 14: "Si", 15: "P", 16: "S",
                   17: "Cl", 35: "Br", 53: "I"}
_EDGE = (0.15, 0.15, 0.15)
_BOND = (0.35, 0.35, 0.35)


def _symbol(value) -> str:
    """An element symbol from a symbol ("C", b"C") or an atomic number (6)."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, (int, np.integer)):
        return _ATOMIC_SYMBOLS.get(int(value), f"Z{int(value)}")
    return str(value).strip().capitalize()


def _bond_segments(bonds, n: int, xy: np.ndarray) -> tuple:
    """``(segments [k, 2, 2], bond orders [k] clipped to 1..3)`` of the bonds between atoms."""
    bonds = np.asarray(bonds)
    if bonds.shape != (n, n):
        raise ValueError(f"bonds must be a bond-order matrix of shape [{n}, {n}] (one row and "
                         f"column per atom), got {bonds.shape}")
    i, j = np.nonzero(np.triu(bonds, 1))
    order = np.clip(np.abs(bonds[i, j]).astype(np.float64), 1.0, 3.0)
    return np.stack([xy[i], xy[j]], 1), order


def render_molecule(symbols, positions, bonds=None, size: int = 128, elev: float = 20.0,
                    azim: float = 30.0) -> np.ndarray:
    """A ball-and-stick picture of a molecule: uint8 [size, size, 3], white background.

    ``symbols`` are element symbols ("C") or atomic numbers (6), ``positions`` float [n, 3] in
    Angstrom; ``bonds``, an int [n, n] bond-order matrix, draws a stick between every pair of
    atoms where it is nonzero (thicker for double and triple bonds). Atoms are balls in CPK-like
    colours (H white, C dark grey, N blue, O red, F green, others pink, each with a dark edge)
    sized by element, darker the farther they are; the camera is :func:`render_points`'s, and
    the molecule fills the picture.
    """
    positions = _points("positions", positions)
    names = [_symbol(s) for s in np.asarray(symbols).reshape(-1).tolist()]
    if len(names) != len(positions):
        raise ValueError(f"render_molecule got {len(names)} symbols for {len(positions)} "
                         f"positions; give one symbol per atom")
    size = _check_size(size)
    xy, depth, order, radius = _project(positions, elev, azim)
    colour, ball = zip(*(_ELEMENTS.get(name, _OTHER_ELEMENT) for name in names))
    rgb = np.array(colour) * (0.35 + 0.65 * _shade(depth, radius + 1e-9))[:, None]
    half_width = 1.08 * (np.abs(xy).max() + max(ball))
    pixels_per_unit = size / (2.0 * half_width)
    with _RENDER_LOCK:
        canvas, axes = _axes(size)
        if bonds is not None:
            segments, widths = _bond_segments(bonds, len(positions), xy)
            if len(segments):
                from matplotlib.collections import LineCollection  # present: _axes found it
                axes.add_collection(LineCollection(
                    segments, colors=[_BOND], linewidths=widths * 0.12 * pixels_per_unit * 72.0
                    / size, capstyle="round", zorder=1))
        diameters = 2.0 * np.array(ball) * pixels_per_unit * 72.0 / size  # in points
        axes.scatter(xy[order, 0], xy[order, 1], s=diameters[order] ** 2, c=rgb[order],
                     edgecolors=[_EDGE], linewidths=max(0.5, size / 256.0) * 72.0 / size,
                     zorder=2)
        return _pixels(canvas, axes, half_width, size)


def render_grid(images, columns=None, gap: int = 2) -> np.ndarray:
    """Tile uint8 images [N, H, W, 3] row by row, ``gap`` white pixels apart: uint8 [H', W', 3].

    ``columns`` defaults to a square layout; cells past the last image stay white.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) == 0:
        raise ValueError(f"render_grid needs uint8 images [N, H, W, C], got {images.dtype} "
                         f"{images.shape}")
    num, height, width, channels = images.shape
    columns = int(columns or math.ceil(math.sqrt(num)))
    rows = math.ceil(num / columns)
    grid = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap, channels), 255,
                   np.uint8)
    for k in range(num):
        r, c = divmod(k, columns)
        top, left = r * (height + gap), c * (width + gap)
        grid[top:top + height, left:left + width] = images[k]
    return grid
