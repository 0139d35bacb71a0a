"""Point clouds: ShapePoints data, set distances and their metrics, PLY files and renders."""

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest

from diffusion_jax import point_eval
from diffusion_jax.data.points import SHAPES, ShapePoints, random_rotation
from diffusion_jax.data.sources import DataError
from diffusion_jax.point_eval import (
    chamfer,
    emd,
    pairwise_chamfer,
    pairwise_emd,
    read_ply,
    render_grid,
    render_molecule,
    render_points,
    set_distances,
    write_ply,
)

SOURCE = ShapePoints(size=1000, num_points=128, seed=4)
K = len(SHAPES)


def _local(source, index):
    """Record ``index``'s points in its shape's own frame, float64, and its ground truth."""
    truth = source.geometry(index)
    x = source[index]["x"].astype(np.float64)
    return (x - truth["centre"]) @ truth["rotation"], truth


def _records_of(shape, count, num_points, seed=0):
    """The local points and ground truth of the first ``count`` records of ``shape``."""
    source = ShapePoints(size=K * count, num_points=num_points, seed=seed)
    return [_local(source, SHAPES.index(shape) + K * k) for k in range(count)]


def test_records_are_deterministic_centred_float32_and_balanced():
    again = ShapePoints(size=1000, num_points=128, seed=4)
    for i in (0, 7, 999, -1):
        a, b = SOURCE[i], again[i]
        assert a["x"].dtype == np.float32 and a["x"].shape == (128, 3)
        np.testing.assert_array_equal(a["x"], b["x"])
        assert np.abs(a["x"].astype(np.float64).mean(0)).max() < 1e-5
        assert a["label"].dtype == np.int32
    assert not np.allclose(SOURCE[3]["x"], ShapePoints(size=1000, seed=5)[3]["x"])
    labels = [int(SOURCE[i]["label"]) for i in range(10 * K)]
    assert labels == [i % K for i in range(10 * K)]
    assert np.bincount(labels).tolist() == [10] * K
    assert SOURCE.num_classes == K == 6 and len(SOURCE) == 1000
    assert SOURCE.geometry(2)["shape"] == SHAPES[int(SOURCE[2]["label"])]
    assert "ShapePoints(size=1000" in repr(SOURCE)
    with pytest.raises(IndexError, match="out of range"):
        SOURCE[1000]
    with pytest.raises(DataError, match="num_points"):
        ShapePoints(num_points=1)


def _off_surface(shape, p, g):
    """Each point's distance from the ideal surface (exact formulas, own frame)."""
    rho, z = np.hypot(p[:, 0], p[:, 1]), p[:, 2]
    if shape == "sphere":
        return np.abs(np.linalg.norm(p, axis=1) - g["radius"])
    if shape == "cube":
        return np.abs(np.abs(p).max(1) - g["half_side"])
    if shape == "torus":
        return np.abs(np.hypot(rho - g["major_radius"], z) - g["tube"])
    if shape == "cylinder":
        a, h = g["cylinder_radius"], g["half_height"]
        on_side = np.abs(rho - a) + np.maximum(np.abs(z) - h, 0)
        on_cap = np.abs(np.abs(z) - h) + np.maximum(rho - a, 0)
        return np.minimum(on_side, on_cap)
    if shape == "cone":
        b, height = g["base_radius"], g["height"]
        inside = np.maximum(np.abs(z) - height / 2, 0)
        on_side = np.abs(rho - b * (0.5 - z / height)) + inside
        on_base = np.abs(z + height / 2) + np.maximum(rho - b, 0)
        return np.minimum(on_side, on_base)
    assert shape == "octahedron"
    return np.abs(np.abs(p).sum(1) - g["radius"])


@pytest.mark.parametrize("shape", SHAPES)
def test_every_point_lies_on_its_shape_in_the_ground_truth_frame(shape):
    for p, g in _records_of(shape, 4, 256):
        assert g["shape"] == shape and 0.6 <= g["radius"] <= 1.0
        assert _off_surface(shape, p, g).max() < 1e-5
        # The radius is the circumradius: nothing is farther from the centre, and some point
        # comes close (the cone's base rim, the cube's corners are reached least often).
        norms = np.linalg.norm(p, axis=1)
        assert norms.max() <= g["radius"] + 1e-5 and norms.max() > 0.7 * g["radius"]
    # The check would notice a point off the surface, or another shape.
    assert _off_surface(shape, p * 1.01, g).max() > 1e-3
    other = SHAPES[(SHAPES.index(shape) + 1) % K]
    q, _ = _records_of(other, 1, 256)[0]
    assert _off_surface(shape, q, g).max() > 1e-2


def _chi_square(counts):
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


def test_the_cube_is_sampled_uniformly_by_area():
    """54 cells (each face in 3 x 3): chi-square of 53 degrees of freedom, 99.99% below 106."""
    (p, g), = _records_of("cube", 1, 10_800)
    face = np.abs(p).argmax(1)
    side = np.sign(p[np.arange(len(p)), face]) > 0
    u = p / g["half_side"]  # in [-1, 1]
    others = np.stack([u[np.arange(len(p)), (face + 1) % 3], u[np.arange(len(p)), (face + 2) % 3]])
    cell = np.clip(((others + 1) * 1.5).astype(int), 0, 2)
    index = ((face * 2 + side) * 3 + cell[0]) * 3 + cell[1]
    counts = np.bincount(index, minlength=54)
    assert _chi_square(counts) < 106, counts
    # A sphere's points pushed onto the cube crowd the faces' middles: the test tells.
    sphere = np.random.default_rng(0).standard_normal((10_800, 3))
    on_cube = sphere / np.abs(sphere).max(1, keepdims=True)
    face = np.abs(on_cube).argmax(1)
    others = np.stack([on_cube[np.arange(10_800), (face + 1) % 3],
                       on_cube[np.arange(10_800), (face + 2) % 3]])
    cell = np.clip(((others + 1) * 1.5).astype(int), 0, 2)
    side = np.sign(on_cube[np.arange(10_800), face]) > 0
    wrong = np.bincount(((face * 2 + side) * 3 + cell[0]) * 3 + cell[1], minlength=54)
    assert _chi_square(wrong) > 300


def test_cylinder_cone_and_torus_follow_their_areas():
    n = 20_000
    tolerance = 4.5 * math.sqrt(0.25 / n)  # 4.5 binomial standard deviations at most
    for p, g in _records_of("cylinder", 3, n):
        a, h = g["cylinder_radius"], g["half_height"]
        on_cap = np.abs(np.abs(p[:, 2]) - h) < 1e-5
        assert abs(on_cap.mean() - a / (a + 2 * h)) < tolerance
        # Caps uniform by area: the squared distance from the axis is uniform in [0, a^2].
        rho2 = (p[on_cap, 0] ** 2 + p[on_cap, 1] ** 2) / a**2
        assert abs(rho2.mean() - 0.5) < 0.02
        assert abs(p[~on_cap, 2].mean()) < 0.03 * h  # the side evenly along its height
    for p, g in _records_of("cone", 3, n):
        b, height = g["base_radius"], g["height"]
        on_base = np.abs(p[:, 2] + height / 2) < 1e-5
        slant = math.hypot(b, height)
        assert abs(on_base.mean() - b / (b + slant)) < tolerance
        # Lateral points: the share within half the slant of the apex is a quarter of them.
        near_apex = p[~on_base, 2] > 0.0
        assert abs(near_apex.mean() - 0.25) < tolerance
    for p, g in _records_of("torus", 3, n):
        # The outer half of the tube has more area: 1/2 + tube / (pi R) of it, not 1/2.
        outer = np.hypot(p[:, 0], p[:, 1]) > g["major_radius"]
        expected = 0.5 + g["tube"] / (math.pi * g["major_radius"])
        assert expected > 0.57 and abs(outer.mean() - expected) < tolerance


def test_random_rotations_are_proper_and_spread_over_every_direction():
    rng = np.random.default_rng(0)
    rotations = np.stack([random_rotation(rng) for _ in range(3000)])
    assert rotations.dtype == np.float64 and rotations.shape == (3000, 3, 3)
    np.testing.assert_allclose(np.linalg.det(rotations), 1.0, atol=1e-12)
    np.testing.assert_allclose(rotations @ rotations.transpose(0, 2, 1),
                               np.broadcast_to(np.eye(3), rotations.shape), atol=1e-12)
    # Haar measure: every column is uniform on the sphere, and the mean rotation is 0.
    assert np.abs(rotations.mean(0)).max() < 0.06
    axis = rotations[:, :, 2]
    assert abs((axis[:, 2] > 0.5).mean() - 0.25) < 0.03  # a cap with a quarter of the area
    source_rotations = [SOURCE.geometry(i)["rotation"] for i in range(12)]
    np.testing.assert_allclose(np.linalg.det(source_rotations), 1.0, atol=1e-12)


def test_chamfer_matches_a_brute_force_loop_and_pairwise_matches_chamfer(monkeypatch):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((7, 3)), rng.standard_normal((5, 3))
    one_way = lambda x, y: np.mean([min(np.sum((p - q) ** 2) for q in y) for p in x])  # noqa: E731
    assert chamfer(a, b) == pytest.approx(one_way(a, b) + one_way(b, a), rel=1e-12)
    assert chamfer(a, b) == pytest.approx(chamfer(b, a), rel=1e-12)
    assert chamfer(a, a) < 1e-12 and chamfer(a, a[::-1]) < 1e-12
    assert chamfer(a, a + [0.1, 0, 0]) == pytest.approx(0.02, rel=1e-9)
    A, B = rng.standard_normal((5, 9, 3)), rng.standard_normal((7, 6, 3))
    expected = np.array([[chamfer(x, y) for y in B] for x in A])
    np.testing.assert_allclose(pairwise_chamfer(A, B), expected, atol=2e-5)
    # Blocks smaller than the problem: rows and columns chunked, the last ones padded.
    monkeypatch.setattr(point_eval, "_BLOCK_ELEMENTS", 9 * 6 * 3 * 2)
    np.testing.assert_allclose(pairwise_chamfer(A, B), expected, atol=2e-5)
    assert np.abs(np.diag(pairwise_chamfer(A))).max() < 1e-5
    with pytest.raises(ValueError, match=r"\[sets, points, 3\]"):
        pairwise_chamfer(a, B)


def test_emd_matches_the_best_of_all_permutations():
    pytest.importorskip("scipy")
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    brute = min(np.mean(np.linalg.norm(a - b[list(perm)], axis=1))
                for perm in itertools.permutations(range(5)))
    assert emd(a, b) == pytest.approx(brute, rel=1e-12)
    assert emd(a, b[::-1]) == pytest.approx(brute, rel=1e-12)
    assert emd(a, a[[3, 1, 4, 0, 2]]) < 1e-12
    assert emd(a, a + [0, 0.25, 0]) == pytest.approx(0.25, rel=1e-9)  # Euclidean, not squared
    A = rng.standard_normal((4, 6, 3))
    expected = np.array([[emd(x, y) for y in A] for x in A])
    np.testing.assert_allclose(pairwise_emd(A), expected, atol=1e-12)
    np.testing.assert_allclose(pairwise_emd(A[:2], A), expected[:2], atol=1e-12)
    with pytest.raises(ValueError, match="as many points"):
        emd(a, b[:4])


def test_mmd_coverage_and_1nna_behave_at_their_extremes():
    pytest.importorskip("scipy")
    sets = np.stack([ShapePoints(size=12, num_points=24, seed=6)[i]["x"] for i in range(12)])
    same = set_distances(sets, sets)
    for name in ("chamfer", "emd"):
        assert same[f"{name}_mmd"] < 1e-6 and same[f"{name}_cov"] == 1.0
        assert same[f"{name}_1nna"] == 0.0  # every set's nearest is its copy on the other side
    far = set_distances(sets + 100.0, sets)
    assert far["chamfer_1nna"] == 1.0 and far["emd_1nna"] == 1.0
    assert far["chamfer_mmd"] > 1e4 and far["emd_mmd"] > 99
    # Generating one reference set over and over covers one of 12.
    copies = set_distances(np.repeat(sets[:1], 5, 0), sets, metrics=("chamfer",))
    assert copies["chamfer_cov"] == pytest.approx(1 / 12) and set(copies) == {
        "chamfer_mmd", "chamfer_cov", "chamfer_1nna"}
    assert copies["chamfer_mmd"] == pytest.approx(pairwise_chamfer(sets[:1], sets).mean())
    with pytest.raises(ValueError, match="unknown set distances"):
        set_distances(sets, sets, metrics=("hausdorff",))


def test_ply_files_round_trip_and_bad_ones_are_named(tmp_path):
    points = SOURCE[0]["x"]
    colours = np.random.default_rng(3).integers(0, 256, (128, 3)).astype(np.uint8)
    write_ply(str(tmp_path / "plain.ply"), points)
    read, none = read_ply(str(tmp_path / "plain.ply"))
    np.testing.assert_array_equal(read, points)
    assert none is None and read.dtype == np.float32
    write_ply(str(tmp_path / "sub" / "colour.ply"), points, colours)
    read, got = read_ply(str(tmp_path / "sub" / "colour.ply"))
    np.testing.assert_array_equal(read, points)
    np.testing.assert_array_equal(got, colours)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["colour.ply"]  # no temp file left
    text = (tmp_path / "plain.ply").read_text()
    assert text.startswith("ply\nformat ascii 1.0\n") and "element vertex 128\n" in text
    broken = {
        "short.ply": text.rsplit("\n", 5)[0],
        "binary.ply": text.replace("format ascii 1.0", "format binary_little_endian 1.0"),
        "noheader.ply": "hello\n",
        "words.ply": text.replace(text.splitlines()[-1], "a b c"),
    }
    for name, content in broken.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(DataError, match=name):
            read_ply(str(tmp_path / name))
    with pytest.raises(ValueError, match="uint8"):
        write_ply(str(tmp_path / "x.ply"), points, colours.astype(np.float32))


def _ink(image):
    return int((image.min(-1) < 235).sum())


def test_renders_draw_points_and_molecules():
    pytest.importorskip("matplotlib")
    sphere, cube = SOURCE[0]["x"], SOURCE[1]["x"]
    image = render_points(sphere, size=96)
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    assert _ink(image) > 400 and (image == 255).all(-1).sum() > 2000  # dots on white
    assert np.abs(image.astype(int) - render_points(cube, size=96)).mean() > 5
    np.testing.assert_array_equal(image, render_points(sphere, size=96))
    red = render_points(sphere, size=64, colors=np.tile([[255, 0, 0]], (128, 1)).astype(np.uint8))
    assert red.shape == (64, 64, 3)
    inked = red[red.min(-1) < 160].astype(int)  # dots, not their anti-aliased rims
    assert len(inked) > 100 and (inked[:, 0] > inked[:, 2] + 60).mean() > 0.95
    # Water: red oxygen, white hydrogens with dark edges, two bonds.
    positions = np.array([[0.0, 0.0, 0.0], [0.76, 0.59, 0.0], [-0.76, 0.59, 0.0]])
    bonds = np.array([[0, 1, 1], [1, 0, 0], [1, 0, 0]])
    water = render_molecule(["O", "H", "H"], positions, bonds, size=96)
    assert water.shape == (96, 96, 3) and water.dtype == np.uint8
    pixels = water.reshape(-1, 3).astype(int)
    assert ((pixels[:, 0] > 150) & (pixels[:, 1] < 80) & (pixels[:, 2] < 80)).sum() > 100
    nitrogen = render_molecule([7, 1, 1], positions, size=96).reshape(-1, 3).astype(int)
    assert ((nitrogen[:, 2] > 150) & (nitrogen[:, 0] < 100)).sum() > 100
    assert not np.array_equal(water, render_molecule(["O", "H", "H"], positions, size=96))
    with pytest.raises(ValueError, match="one symbol per atom"):
        render_molecule(["O", "H"], positions)
    grid = render_grid(np.stack([image, image, image]), columns=2, gap=2)
    assert grid.shape == (194, 194, 3) and (grid[98:, 98:] == 255).all()
    np.testing.assert_array_equal(grid[:96, 98:], image)


def test_the_point_modules_import_without_matplotlib_or_scipy():
    code = ("import sys; import diffusion_jax.point_eval, diffusion_jax.data.points; "
            "print(sorted(m for m in ('matplotlib', 'scipy.optimize') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
