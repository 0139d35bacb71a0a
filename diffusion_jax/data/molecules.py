"""Molecule data: 3-D molecules as fixed-size point clouds with atom types, for E(3) diffusion.

Records are ``{"x": float32 [max_atoms, 3 + K], "mask": float32 [max_atoms]}`` for K atom types
(``elements``, by default H, C, N, O and F). The rows of a molecule's atoms come first, in the
order of its file (or of RDKit's atoms), and the rest are zeros. ``x[:, :3]`` holds positions in
Ångström, centred so that the mean over the atoms is zero and turned by a uniformly random
rotation (drawn from (seed, index)); ``x[:, 3:]`` is the one-hot atom type times
``feature_scale`` (0.25 in Hoogeboom et al. 2022). ``mask`` is 1 for atoms, 0 for padding.

:class:`SmilesMolecules` builds molecules from SMILES strings (by default the list of
:mod:`~diffusion_jax.data.smiles`): with their hydrogens, a conformer embedded by RDKit's ETKDG
from a seed drawn from (seed, index), then relaxed by the MMFF94 force field (UFF where MMFF has
no parameters). :class:`MoleculeFolder` reads the .xyz and .sdf files under a folder (see
:mod:`~diffusion_jax.data.molecule_files`); files it cannot use are left out with a log line
each. :func:`encode` and :func:`decode` convert between molecules and records.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional, Sequence

import numpy as np

from diffusion_jax.data.folder import _some
from diffusion_jax.data.molecule_files import (
    ATOMIC_NUMBERS,
    ELEMENTS,
    MOLECULE_EXTENSIONS,
    rdkit_chem,
    read_molecules,
)
from diffusion_jax.data.points import random_rotation  # (the same draw for shapes and molecules)
from diffusion_jax.data.smiles import SMILES
from diffusion_jax.data.sources import DataError, _rng

__all__ = ["ELEMENTS", "MoleculeFolder", "SmilesMolecules", "check_elements", "decode", "encode",
           "random_rotation"]

_EMBED_TRIES = 10  # ETKDG seeds tried per example; the second half start from random coordinates
_OPTIMIZER_STEPS = 1000  # force-field iterations, enough for these small molecules to converge


def check_elements(elements: Sequence[str]) -> tuple:
    """``elements`` as a tuple, or a DataError unless they are distinct element symbols."""
    if isinstance(elements, str):
        elements = (elements,)
    elements = tuple(elements)
    unknown = [e for e in elements if e not in ATOMIC_NUMBERS]
    if not elements or unknown or len(set(elements)) != len(elements):
        why = (f"{', '.join(map(repr, unknown))} are not element symbols (write them as 'C', "
               "'Cl')" if unknown else "it must list distinct element symbols, at least one")
        raise DataError(f"config.data.elements={elements!r} is not a list of atom types: {why}")
    return elements


def _check_settings(max_atoms, feature_scale) -> tuple:
    """``(max_atoms, feature_scale)`` as int and float, or a DataError naming the config key."""
    if isinstance(max_atoms, bool) or not isinstance(max_atoms, (int, np.integer)) \
            or max_atoms < 1:
        raise DataError(f"config.data.max_atoms must be a whole number >= 1, got {max_atoms!r}")
    if not (isinstance(feature_scale, (int, float, np.floating)) and math.isfinite(feature_scale)
            and feature_scale > 0):
        raise DataError(f"config.data.feature_scale must be a number > 0, got {feature_scale!r}")
    return int(max_atoms), float(feature_scale)


def _check_fits(symbols: Sequence[str], elements: tuple, max_atoms: int,
                where: Optional[str]) -> None:
    """Raise a DataError unless the molecule has 1 to ``max_atoms`` atoms, all of ``elements``."""
    prefix = f"{where}: " if where else ""
    if not symbols:
        raise DataError(f"{prefix}the molecule has no atoms")
    if len(symbols) > max_atoms:
        raise DataError(f"{prefix}molecule with {len(symbols)} atoms; the model takes at most "
                        f"config.data.max_atoms={max_atoms}: raise config.data.max_atoms to "
                        f"{len(symbols)} or more, or leave the molecule out")
    foreign = sorted(set(symbols) - set(elements), key=lambda s: ATOMIC_NUMBERS.get(s, 0))
    if foreign:
        raise DataError(f"{prefix}the molecule has {', '.join(foreign)} atoms, outside the atom "
                        f"types config.data.elements={elements!r}: add {', '.join(foreign)} to "
                        "config.data.elements, or leave the molecules holding them out")


def encode(symbols: Sequence[str], positions, elements: Sequence[str], max_atoms: int,
           feature_scale: float = 0.25, rng: Optional[np.random.Generator] = None,
           where: Optional[str] = None) -> tuple:
    """A molecule as a record's ``(x float32 [max_atoms, 3 + K], mask float32 [max_atoms])``.

    Positions are centred on the atoms' mean and, when ``rng`` is given, turned by a uniformly
    random rotation drawn from it. A molecule with more than ``max_atoms`` atoms or with an
    element outside ``elements`` raises a DataError, which names ``where`` (the file) if given.
    """
    elements = check_elements(elements)
    max_atoms, feature_scale = _check_settings(max_atoms, feature_scale)
    symbols = list(symbols)
    positions = np.asarray(positions, np.float64)
    if positions.shape != (len(symbols), 3):
        raise ValueError(f"a molecule needs positions of shape [atoms, 3] and one symbol per atom, "
                         f"got positions {positions.shape} and {len(symbols)} symbols")
    _check_fits(symbols, elements, max_atoms, where)
    centred = positions - positions.mean(axis=0)
    if rng is not None:
        centred = centred @ random_rotation(rng).T
    centred = centred.astype(np.float32)
    centred -= centred.mean(axis=0)  # the mean of the float32 values is zero too
    n = len(symbols)
    x = np.zeros((max_atoms, 3 + len(elements)), np.float32)
    x[:n, :3] = centred
    x[np.arange(n), 3 + np.array([elements.index(s) for s in symbols])] = feature_scale
    mask = np.zeros(max_atoms, np.float32)
    mask[:n] = 1.0
    return x, mask


def decode(x, mask, elements: Sequence[str]) -> list:
    """Molecules from records: ``[(symbols, positions float64 [n, 3])]`` for a batch.

    ``x`` is [batch, max_atoms, 3 + K] (or one record, [max_atoms, 3 + K]) and ``mask``
    [batch, max_atoms]; atoms are the rows whose mask is above 0.5, and each atom's element is
    the feature channel with the largest value.
    """
    elements = check_elements(elements)
    x, mask = np.asarray(x), np.asarray(mask)
    if x.ndim == 2:
        x, mask = x[None], mask[None]
    if x.ndim != 3 or x.shape[-1] != 3 + len(elements) or mask.shape != x.shape[:2]:
        raise ValueError(f"decode needs x of shape [batch, atoms, {3 + len(elements)}] (3 "
                         f"coordinates and {len(elements)} atom types) and a mask [batch, atoms], "
                         f"got x {x.shape} and mask {mask.shape}")
    molecules = []
    for features, present in zip(x, mask > 0.5):
        types = np.argmax(features[present, 3:], axis=-1)
        molecules.append(([elements[t] for t in types],
                          features[present, :3].astype(np.float64)))
    return molecules


def _check_count(name: str, value, key: str) -> int:
    """``value`` as an int, or a DataError naming ``key`` unless it is a whole number >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(f"{key} must be a whole number >= 1, got {name}={value!r}")
    return int(value)


def _relax(mol) -> None:
    """Relax ``mol``'s conformer with MMFF94, or UFF where MMFF lacks parameters for it."""
    from rdkit.Chem import AllChem

    if AllChem.MMFFHasAllMoleculeParams(mol):
        AllChem.MMFFOptimizeMolecule(mol, maxIters=_OPTIMIZER_STEPS)
    elif AllChem.UFFHasAllMoleculeParams(mol):
        AllChem.UFFOptimizeMolecule(mol, maxIters=_OPTIMIZER_STEPS)


def _embed(mol, seed: int, smiles: str):
    """A copy of ``mol`` with one conformer: ETKDG from ``seed`` (then the next seeds), relaxed."""
    Chem = rdkit_chem("building molecules from SMILES")
    from rdkit.Chem import AllChem

    params = AllChem.ETKDGv3()
    for attempt in range(_EMBED_TRIES):
        params.randomSeed = seed + attempt
        params.useRandomCoords = attempt >= _EMBED_TRIES // 2
        embedded = Chem.Mol(mol)
        if AllChem.EmbedMolecule(embedded, params) == 0:
            _relax(embedded)
            return embedded
    raise DataError(f"RDKit cannot embed the molecule {smiles} in 3-D (tried the ETKDG seeds "
                    f"{seed} to {seed + _EMBED_TRIES - 1}): remove it from the SMILES list")


class SmilesMolecules:
    """Molecules from SMILES strings, each example a fresh 3-D conformer with its hydrogens.

    Example i is molecule ``i % len(molecules)`` of the SMILES that fit the settings: at most
    ``max_atoms`` atoms with hydrogens, at most ``max_heavy_atoms`` others, all of
    ``elements``. Its conformer is embedded by ETKDG (version 3) with a seed drawn from
    ``np.random.default_rng([seed, i])`` (the next seeds if that one fails) and relaxed by
    MMFF94; the same generator then draws the record's rotation. Needs RDKit.
    """

    def __init__(self, size: int, max_atoms: int = 29, elements: Sequence[str] = ELEMENTS,
                 feature_scale: float = 0.25, seed: int = 0,
                 smiles: Optional[Sequence[str]] = None, max_heavy_atoms: int = 9):
        Chem = rdkit_chem("building molecules from SMILES")
        from rdkit import rdBase

        self.size = _check_count("size", size, "the SMILES molecules' size")
        self.max_atoms, self.feature_scale = _check_settings(max_atoms, feature_scale)
        self.max_heavy_atoms = _check_count("max_heavy_atoms", max_heavy_atoms,
                                            "config.data.max_heavy_atoms")
        self.elements, self.seed, self.num_classes = check_elements(elements), int(seed), None
        smiles = SMILES if smiles is None else tuple(smiles)
        self._molecules, unfit = [], {"atoms": 0, "heavy": 0, "foreign": set()}
        with rdBase.BlockLogs():
            for k, text in enumerate(smiles):
                mol = Chem.MolFromSmiles(str(text))
                if mol is None:
                    raise DataError(f"SMILES {k} of the list, {text!r}, does not parse in RDKit: "
                                    "correct it or remove it")
                self._keep(Chem, mol, unfit)
        if not self._molecules:
            raise DataError(self._none_fit(len(smiles), unfit))
        self._counts = np.array([mol.GetNumAtoms() for _, mol in self._molecules], np.int64)

    def _keep(self, Chem, mol, unfit: dict) -> None:
        """Add ``mol`` (with hydrogens) to the molecules if it fits, else count why not."""
        heavy = mol.GetNumAtoms()
        mol = Chem.AddHs(mol)
        foreign = {atom.GetSymbol() for atom in mol.GetAtoms()} - set(self.elements)
        unfit["atoms"] += mol.GetNumAtoms() > self.max_atoms
        unfit["heavy"] += heavy > self.max_heavy_atoms
        unfit["foreign"] |= foreign
        if mol.GetNumAtoms() <= self.max_atoms and heavy <= self.max_heavy_atoms and not foreign:
            self._molecules.append((Chem.MolToSmiles(Chem.RemoveHs(mol)), mol))

    def _none_fit(self, total: int, unfit: dict) -> str:
        """The message saying that none of ``total`` SMILES fits, and which settings to relax."""
        reasons = []
        if unfit["atoms"]:
            reasons.append(f"{unfit['atoms']} have more than config.data.max_atoms="
                           f"{self.max_atoms} atoms with their hydrogens")
        if unfit["heavy"]:
            reasons.append(f"{unfit['heavy']} have more than config.data.max_heavy_atoms="
                           f"{self.max_heavy_atoms} heavy atoms")
        if unfit["foreign"]:
            reasons.append(f"some hold elements outside config.data.elements={self.elements!r} "
                           f"({', '.join(sorted(unfit['foreign']))})")
        return (f"none of the {total} SMILES molecules fits the data settings: "
                + "; ".join(reasons or ["the list is empty"])
                + ": raise those limits or add those elements")

    def __len__(self):
        return self.size

    def _index(self, index) -> int:
        """``index`` as a record index in 0..size-1, or an IndexError."""
        index = int(index)
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} is out of range for {self!r}")
        return index % self.size

    def _conformer(self, index: int) -> tuple:
        """``(symbols, positions, rng)``: example ``index``'s conformer and its generator."""
        rng = _rng(self.seed, index)
        text, mol = self._molecules[index % len(self._molecules)]
        embedded = _embed(mol, int(rng.integers(2 ** 31 - _EMBED_TRIES)), text)
        symbols = [atom.GetSymbol() for atom in embedded.GetAtoms()]
        return symbols, np.array(embedded.GetConformer().GetPositions(), np.float64), rng

    def molecule(self, index) -> tuple:
        """Example ``index``'s ``(symbols, positions float64 [n, 3])``, before centring."""
        symbols, positions, _ = self._conformer(self._index(index))
        return symbols, positions

    def smiles(self, index) -> str:
        """The canonical SMILES (without hydrogens) of example ``index``'s molecule."""
        return self._molecules[self._index(index) % len(self._molecules)][0]

    def atom_counts(self) -> np.ndarray:
        """The number of atoms (hydrogens included) of each example, int64 [size]."""
        return self._counts[np.arange(self.size) % len(self._molecules)]

    @property
    def num_molecules(self) -> int:
        """How many distinct molecules the examples cycle through."""
        return len(self._molecules)

    def __getitem__(self, index):
        symbols, positions, rng = self._conformer(self._index(index))
        x, mask = encode(symbols, positions, self.elements, self.max_atoms, self.feature_scale,
                         rng=rng)
        return {"x": x, "mask": mask}

    def __repr__(self):
        return (f"SmilesMolecules(size={self.size}, max_atoms={self.max_atoms}, "
                f"elements={self.elements!r}, feature_scale={self.feature_scale}, "
                f"seed={self.seed}, num_molecules={self.num_molecules})")


def _scan(path: str) -> list:
    """The .xyz and .sdf files under ``path`` (any letter case), hidden ones left out, sorted."""
    found = []
    for folder, subfolders, names in os.walk(path):
        subfolders[:] = [s for s in subfolders if not s.startswith(".")]
        relative = os.path.relpath(folder, path)
        found += [os.path.normpath(os.path.join(relative, n)) for n in names
                  if not n.startswith(".") and n.lower().endswith(MOLECULE_EXTENSIONS)]
    return sorted(found)


class MoleculeFolder:
    """The molecules of the .xyz and .sdf files under a folder, one example per molecule.

    Files are read when the source is built, in the sorted order of their paths relative to the
    folder (subfolders included; hidden files and folders, whose names start with ".", left
    out). A file that cannot be read is left out with a log line naming it and the reason, and
    so are molecules with more than ``max_atoms`` atoms or with elements outside ``elements``;
    a summary line counts the files left out. Record i's rotation is drawn from
    ``np.random.default_rng([seed, i])``. ``log`` receives the notes (None: print them).
    """

    def __init__(self, path: str, max_atoms: int, elements: Sequence[str] = ELEMENTS,
                 feature_scale: float = 0.25, seed: int = 0,
                 log: Optional[Callable[[str], None]] = print):
        self.max_atoms, self.feature_scale = _check_settings(max_atoms, feature_scale)
        self.elements, self.seed, self.num_classes = check_elements(elements), int(seed), None
        self.path, log = path, print if log is None else log
        if not os.path.isdir(path):
            what = "is a file, not a folder" if os.path.exists(path) else "does not exist"
            raise DataError(f"the molecule folder {path} {what}: set config.data.path to a "
                            "folder of .xyz or .sdf files")
        self._files = _scan(path)
        if not self._files:
            raise DataError(f"the folder {path} holds no molecule files (searched with its "
                            "subfolders for .xyz and .sdf files, any letter case): put the "
                            "training molecules there")
        self._molecules, self._origins, skipped = [], [], []
        for k, name in enumerate(self._files):
            why = self._read(k, name, log)
            if why is not None:
                skipped.append(f"{name} ({why})")
        if not self._molecules:
            raise DataError(f"none of the {len(self._files)} molecule files in {path} holds a "
                            f"usable molecule: {_some(skipped, 3)}")
        if skipped:
            log(f"MoleculeFolder: skipped {len(skipped)} of {len(self._files)} files in {path} "
                f"(the reasons are above); read {len(self._molecules)} molecules from the others")
        self._counts = np.array([len(symbols) for symbols, _ in self._molecules], np.int64)

    def _read(self, k: int, name: str, log: Callable) -> Optional[str]:
        """Add file ``k``'s usable molecules; None, or why none of them is usable (logged)."""
        try:
            molecules = read_molecules(os.path.join(self.path, name))
        except (DataError, OSError) as err:
            log(f"MoleculeFolder: skipped {name}: {err}")
            return str(err)
        problems = []
        for m, (symbols, positions) in enumerate(molecules):
            where = name if len(molecules) == 1 else f"molecule {m + 1} of {name}"
            try:
                _check_fits(symbols, self.elements, self.max_atoms, where)
            except DataError as err:
                problems.append(str(err))
                continue
            self._molecules.append((tuple(symbols), positions))
            self._origins.append(k)
        more = (f" (and {len(problems) - 1} more of its {len(molecules)} molecules)"
                if len(problems) > 1 else "")
        if problems and len(problems) == len(molecules):
            why = (problems[0] if len(molecules) == 1 else
                   f"{name}: none of its {len(molecules)} molecules fits: {problems[0]}{more}")
            log(f"MoleculeFolder: skipped {why}")
            return why
        if problems:
            log(f"MoleculeFolder: left out {len(problems)} of the {len(molecules)} molecules of "
                f"{name}: {problems[0]}{more}")
        return None

    def __len__(self):
        return len(self._molecules)

    def file(self, index) -> str:
        """The path of the file holding example ``index``'s molecule."""
        return os.path.normpath(os.path.join(self.path, self._files[self._origins[index]]))

    def molecule(self, index) -> tuple:
        """Example ``index``'s ``(symbols, positions float64 [n, 3])``, as the file has them."""
        symbols, positions = self._molecules[index]
        return list(symbols), positions.copy()

    def atom_counts(self) -> np.ndarray:
        """The number of atoms of each example, int64 [len(self)]."""
        return self._counts.copy()

    def __getitem__(self, index):
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {self!r}")
        index %= len(self)
        symbols, positions = self._molecules[index]
        x, mask = encode(symbols, positions, self.elements, self.max_atoms, self.feature_scale,
                         rng=_rng(self.seed, index))
        return {"x": x, "mask": mask}

    def __repr__(self):
        return (f"MoleculeFolder(path={self.path!r}, max_atoms={self.max_atoms}, "
                f"elements={self.elements!r}, feature_scale={self.feature_scale}, "
                f"seed={self.seed}, num_molecules={len(self)})")
