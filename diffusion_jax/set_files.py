"""The files and pictures of generated point clouds and molecules; .xyz and .sdf writers.

A point cloud is written as a PLY file; a molecule as an XYZ file, and all of a batch's molecules
as one SDF file whose bonds are those their interatomic distances give
(:func:`~diffusion_jax.molecule_eval.bonds`). Either is drawn as a matplotlib 3-D scatter; a
batch's drawings tile into one grid image, the ``--mode=sample`` grid and the training preview.
Files are replaced only once whole (:func:`diffusion_jax.files.atomic_write`).
"""

from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np

from diffusion_jax import files, molecule_eval, point_eval
from diffusion_jax.config_checks import comma_list
from diffusion_jax.data.molecule_files import rdkit_chem
from diffusion_jax.data.molecules import decode

__all__ = ["present", "molecules_of", "render_sets", "write_sets", "write_xyz",
           "write_xyz_frames", "write_sdf"]

_RENDER_SIZE = 128
_RENDER_LIMIT = 64  # the most sets one grid draws


def present(samples) -> np.ndarray:
    """bool [batch, members]: the members of generated sets that are there (nonzero rows).

    Generation zeroes absent members (:func:`diffusion_jax.set_runs.project`), and a present
    member's projected row is never all zeros, nor is a real record's (its one-hot element)."""
    return np.any(np.asarray(samples) != 0, axis=-1)


def molecules_of(samples, config) -> list:
    """``[(symbols, positions)]`` of generated molecules [batch, atoms, 3 + elements].

    The atoms of a molecule are its nonzero rows (:func:`present`); each atom's element is its
    largest feature channel."""
    samples = np.asarray(samples, np.float32)
    mask = present(samples).astype(np.float32)
    return decode(samples, mask, tuple(comma_list(config.data.elements)))


def _is_molecules(config) -> bool:
    return config.data.name in ("molecules", "molecule_folder")


def _render(symbols, positions, molecule: bool) -> np.ndarray:
    """One set's drawing, or a blank cell for a set with no finite present member."""
    if not len(positions) or not np.all(np.isfinite(positions)):
        return np.full((_RENDER_SIZE, _RENDER_SIZE, 3), 255, np.uint8)
    if molecule:
        return point_eval.render_molecule(symbols, positions,
                                          molecule_eval.bonds(symbols, positions),
                                          size=_RENDER_SIZE)
    return point_eval.render_points(positions, size=_RENDER_SIZE)


def render_sets(samples, config) -> np.ndarray:
    """uint8 [H, W, 3]: a grid of 3-D renders of the first 64 of ``samples``.

    A set that is empty or not finite (a diverging run's sample) is a blank cell, so a preview
    never stops training."""
    samples = np.asarray(samples, np.float32)[:_RENDER_LIMIT]
    if _is_molecules(config):
        images = [_render(symbols, positions, True)
                  for symbols, positions in molecules_of(samples, config)]
    else:
        images = [_render(None, points[:, :3], False) for points in samples]
    return point_eval.render_grid(images)


def write_sets(stem: str, samples, config) -> list:
    """Write ``stem_<i>.ply`` (point clouds) or ``stem_<i>.xyz`` and ``stem.sdf`` (molecules).

    Returns the paths written; the caller writes the grid of renders."""
    samples = np.asarray(samples, np.float32)
    written = []
    if not _is_molecules(config):
        for i, points in enumerate(samples):
            point_eval.write_ply(f"{stem}_{i:03d}.ply", points[:, :3])
            written.append(f"{stem}_{i:03d}.ply")
        return written
    molecules = molecules_of(samples, config)
    mols = []
    for i, (symbols, positions) in enumerate(molecules):
        write_xyz(f"{stem}_{i:03d}.xyz", symbols, positions,
                                 comment=f"generated sample {i}")
        written.append(f"{stem}_{i:03d}.xyz")
        mols.append(molecule_eval.to_rdkit(symbols, positions,
                                           molecule_eval.bonds(symbols, positions)))
    write_sdf(stem + ".sdf", mols)
    return written + [stem + ".sdf"]


def _checked(symbols: Sequence[str], positions) -> tuple:
    """``(symbols list, positions float64 [n, 3])``, or a ValueError when they do not match."""
    positions = np.asarray(positions, np.float64)
    symbols = [str(s) for s in symbols]
    if positions.ndim != 2 or positions.shape[1] != 3 or len(positions) != len(symbols):
        raise ValueError(f"a molecule needs positions of shape [atoms, 3] and one symbol per atom, "
                         f"got positions {positions.shape} and {len(symbols)} symbols")
    return symbols, positions


def write_xyz_frames(path: str, molecules: Sequence, comments: Optional[Sequence] = None) -> None:
    """Write ``molecules`` (each ``(symbols, positions)``) into one .xyz file, one after another.

    ``comments`` gives each molecule's comment line (line breaks become spaces).
    """
    molecules = [_checked(symbols, positions) for symbols, positions in molecules]
    comments = [""] * len(molecules) if comments is None else list(comments)
    if len(comments) != len(molecules):
        raise ValueError(f"{len(molecules)} molecules but {len(comments)} comments")

    lines = []
    for (symbols, positions), comment in zip(molecules, comments):
        lines += [str(len(symbols)), " ".join(str(comment).splitlines())]
        lines += [f"{symbol:<2} {x:15.8f} {y:15.8f} {z:15.8f}"
                  for symbol, (x, y, z) in zip(symbols, positions)]
    _write_text(path, "".join(line + "\n" for line in lines))


def write_xyz(path: str, symbols: Sequence[str], positions, comment: str = "") -> None:
    """Write one molecule (element symbols, positions [n, 3] in Ångström) as an .xyz file."""
    write_xyz_frames(path, [(symbols, positions)], [comment])


def write_sdf(path: str, molecules: Sequence) -> None:
    """Write RDKit molecules (each with a conformer) into an .sdf file, one record each.

    Molecules are written as they are, without sanitizing or kekulizing them, so that molecules
    whose inferred bonds break the valence rules are written too (their name is the ``_Name``
    property when they have one).
    """
    Chem = rdkit_chem("writing .sdf files")
    buffer = io.StringIO()
    writer = Chem.SDWriter(buffer)
    writer.SetKekulize(False)
    for index, mol in enumerate(molecules):
        if mol.GetNumConformers() == 0:
            raise ValueError(f"molecule {index} has no conformer: an .sdf record needs positions")
        copy = Chem.Mol(mol)
        copy.UpdatePropertyCache(strict=False)  # implicit hydrogens, without valence checks
        writer.write(copy)
    writer.close()
    _write_text(path, buffer.getvalue())


def _write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` as UTF-8 with Unix line ends, atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)

    files.atomic_write(path, write)
