"""Metrics of 3-D molecules: bonds from distances, atom and molecule stability, validity.

These are the metrics of Hoogeboom et al. 2022 (EDM, "Equivariant Diffusion for Molecule
Generation in 3D"), computed the way that paper computes them. A generated molecule is only
atoms with positions, so its bonds are inferred from distances: a pair of atoms is bonded when
it is closer than the typical single bond length of its two elements plus 10 pm; the bond is
double when it is also closer than the typical double bond length plus 5 pm, and triple when
closer than the triple bond length plus 3 pm. The typical lengths (:data:`BOND_LENGTHS`) are
the standard covalent bond lengths of organic chemistry, in picometres, as tabulated in
chemistry handbooks (the table EDM uses for H, C, N, O and F; a few values for Cl, Br and S
added from the same kind of table).

An atom is stable when its bond orders add up to its element's valence (:data:`ALLOWED_VALENCE`),
a molecule when all its atoms are. A molecule is valid when RDKit sanitizes the molecule built
from the inferred bonds; as in EDM, RDKit may then give an atom with too few bonds implicit
hydrogens, so validity forgives missing bonds (stability does not) but not atoms with too many.
Its SMILES is the canonical SMILES of its largest fragment, hydrogens left implicit; uniqueness
is the share of distinct SMILES among the valid molecules. Aromatic rings sit between the
thresholds (a benzene bond of 139 to 140 pm reads as single), as they do in EDM. Needs RDKit
for validity and uniqueness (``pip install -e ".[molecules]"``).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from diffusion_jax.data.molecule_files import RDKIT_INSTALL

__all__ = ["ALLOWED_VALENCE", "BOND_LENGTHS", "BOND_MARGINS", "bonds", "evaluate",
           "molecule_smiles", "stability", "to_rdkit"]

ALLOWED_VALENCE = {"H": 1, "C": 4, "N": 3, "O": 2, "F": 1}
# Typical covalent bond lengths in pm: (single, double, triple), None where there is no such bond.
BOND_LENGTHS = {
    ("H", "H"): (74, None, None), ("H", "C"): (109, None, None), ("H", "N"): (101, None, None),
    ("H", "O"): (96, None, None), ("H", "F"): (92, None, None),
    ("C", "C"): (154, 134, 120), ("C", "N"): (147, 129, 116), ("C", "O"): (143, 120, 113),
    ("C", "F"): (135, None, None),
    ("N", "N"): (145, 125, 110), ("N", "O"): (140, 121, None), ("N", "F"): (136, None, None),
    ("O", "O"): (148, 121, None), ("O", "F"): (142, None, None), ("F", "F"): (142, None, None),
    ("H", "Cl"): (127, None, None), ("C", "Cl"): (177, None, None),
    ("Cl", "Cl"): (199, None, None), ("H", "Br"): (141, None, None),
    ("C", "Br"): (194, None, None), ("H", "S"): (134, None, None), ("C", "S"): (182, 160, None),
    ("S", "S"): (204, None, None),
}
BOND_MARGINS = (10, 5, 3)  # pm added to the single, double and triple bond lengths


def _rdkit():
    """RDKit's ``Chem`` module, or an ImportError saying how to install it."""
    try:
        from rdkit import Chem
    except ImportError as err:
        raise ImportError(f"molecule validity and uniqueness need RDKit: `{RDKIT_INSTALL}") \
            from err
    return Chem


def _limits(kinds: Sequence[str]) -> np.ndarray:
    """``[3, K, K]`` distance limits in pm for single, double and triple bonds between kinds."""
    limits = np.full((3, len(kinds), len(kinds)), -np.inf)
    for a, first in enumerate(kinds):
        for b, second in enumerate(kinds):
            lengths = BOND_LENGTHS.get((first, second)) or BOND_LENGTHS.get((second, first))
            for order, (length, margin) in enumerate(zip(lengths or (), BOND_MARGINS)):
                if length is not None:
                    limits[order, a, b] = length + margin
    return limits


def bonds(symbols: Sequence[str], positions) -> np.ndarray:
    """The inferred bond orders, int [n, n] with 0 (no bond), 1, 2 or 3; positions in Ångström.

    A pair of elements missing from :data:`BOND_LENGTHS` is never bonded.
    """
    positions = np.asarray(positions, np.float64)
    if positions.shape != (len(symbols), 3):
        raise ValueError(f"bonds needs positions of shape [atoms, 3] and one symbol per atom, "
                         f"got positions {positions.shape} and {len(symbols)} symbols")
    kinds = sorted(set(symbols))
    kind = np.array([kinds.index(s) for s in symbols], np.int64)
    limits = _limits(kinds)[:, kind[:, None], kind[None, :]]
    distance = 100.0 * np.linalg.norm(positions[:, None] - positions[None, :], axis=-1)
    single, double, triple = (distance < limits[k] for k in range(3))
    # Nested as in EDM: a double bond must pass the single test, a triple one the double test.
    order = single * (1 + double * (1 + triple.astype(np.int64)))
    np.fill_diagonal(order, 0)
    return order.astype(np.int64)


def _stable_atoms(symbols: Sequence[str], bond_matrix: np.ndarray,
                  allowed_valence: Mapping) -> int:
    """How many atoms have bond orders adding up to (one of) their element's valences."""
    totals = np.asarray(bond_matrix).sum(axis=1)
    stable = 0
    for symbol, total in zip(symbols, totals):
        valence = allowed_valence.get(symbol, ())
        stable += int(total) in (valence if isinstance(valence, (tuple, list)) else (valence,))
    return stable


def stability(symbols: Sequence[str], positions,
              allowed_valence: Mapping = ALLOWED_VALENCE) -> tuple:
    """``(stable atoms, atoms)`` of a molecule, its bonds inferred from its positions.

    An atom is stable when its bond orders add up to its element's valence in
    ``allowed_valence`` (an int, or a tuple of allowed ints); an element missing there never is.
    """
    return _stable_atoms(symbols, bonds(symbols, positions), allowed_valence), len(symbols)


def to_rdkit(symbols: Sequence[str], positions, bond_matrix: Optional[np.ndarray] = None):
    """An RDKit molecule of the atoms, with the bonds of ``bond_matrix`` and one 3-D conformer.

    ``bond_matrix`` (int [n, n], orders 1 to 3) defaults to :func:`bonds` of the positions. The
    molecule is not sanitized: it may break valence rules, as generated molecules do.
    """
    Chem = _rdkit()
    positions = np.asarray(positions, np.float64)
    bond_matrix = bonds(symbols, positions) if bond_matrix is None else np.asarray(bond_matrix)
    types = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE}
    mol = Chem.RWMol()
    for symbol in symbols:
        mol.AddAtom(Chem.Atom(symbol))
    for i, j in zip(*np.nonzero(np.triu(bond_matrix, 1))):
        mol.AddBond(int(i), int(j), types[int(bond_matrix[i, j])])
    conformer = Chem.Conformer(len(symbols))
    conformer.SetPositions(positions)
    conformer.Set3D(True)
    mol.AddConformer(conformer, assignId=True)
    return mol.GetMol()


def _smiles(Chem, mol) -> Optional[str]:
    """The canonical SMILES of ``mol``'s largest fragment, or None where RDKit cannot sanitize."""
    mol = Chem.Mol(mol)
    try:
        Chem.SanitizeMol(mol)
    except ValueError:  # RDKit's sanitization errors (valence, kekulization) are ValueErrors
        return None
    if mol.GetNumAtoms() == 0:
        return None
    largest = max(Chem.GetMolFrags(mol, asMols=True), key=lambda m: m.GetNumAtoms())
    try:
        largest = Chem.RemoveHs(largest)
    except ValueError:
        return None
    return Chem.MolToSmiles(largest)


def _connected(bond_matrix) -> bool:
    """Whether the bonds join all atoms into one molecule (one fragment)."""
    n = len(bond_matrix)
    if n == 0:
        return False
    reached, frontier = {0}, [0]
    while frontier:
        i = frontier.pop()
        for j in np.flatnonzero(bond_matrix[i]):
            if int(j) not in reached:
                reached.add(int(j))
                frontier.append(int(j))
    return len(reached) == n


def molecule_smiles(symbols: Sequence[str], positions) -> Optional[str]:
    """A molecule's canonical SMILES (largest fragment, bonds inferred), or None if invalid."""
    from rdkit import rdBase

    Chem = _rdkit()
    with rdBase.BlockLogs():
        return _smiles(Chem, to_rdkit(symbols, positions))


def evaluate(molecules: Sequence, reference_smiles: Optional[Sequence[str]] = None,
             allowed_valence: Mapping = ALLOWED_VALENCE) -> dict:
    """EDM's metrics of molecules, each ``(symbols, positions [n, 3] in Ångström)``.

    Returns ``atom_stability`` (stable atoms / atoms), ``molecule_stability`` (the share of
    molecules whose atoms are all stable), ``validity`` (the share RDKit sanitizes),
    ``uniqueness`` (distinct SMILES / valid molecules), ``num_molecules`` and ``mean_atoms``;
    given ``reference_smiles`` (the training set's canonical SMILES, without stereochemistry),
    also ``novelty``: the share of the distinct valid SMILES not among them. Beyond EDM's
    metrics, ``connected`` is the share of molecules whose bonds join all their atoms, and
    ``valid_and_connected`` the share that are both: validity alone counts a cloud of unbonded
    atoms as valid (its largest fragment, one atom, sanitizes). A molecule without atoms counts
    as neither stable, valid nor connected.
    """
    from rdkit import rdBase

    Chem = _rdkit()
    if not len(molecules):
        raise ValueError("evaluate needs at least one molecule")
    atoms = stable_atoms = stable_molecules = valid_connected = connected = 0
    smiles = []
    with rdBase.BlockLogs():  # RDKit would log every failed sanitization on stderr
        for symbols, positions in molecules:
            bond_matrix = bonds(symbols, positions)
            stable = _stable_atoms(symbols, bond_matrix, allowed_valence)
            atoms, stable_atoms = atoms + len(symbols), stable_atoms + stable
            stable_molecules += bool(len(symbols)) and stable == len(symbols)
            found = _smiles(Chem, to_rdkit(symbols, positions, bond_matrix)) if symbols else None
            whole = bool(len(symbols)) and _connected(bond_matrix)
            connected += whole
            if found is not None:
                smiles.append(found)
                valid_connected += whole
    distinct = set(smiles)
    result = {
        "atom_stability": stable_atoms / max(atoms, 1),
        "molecule_stability": stable_molecules / len(molecules),
        "validity": len(smiles) / len(molecules),
        "uniqueness": len(distinct) / len(smiles) if smiles else 0.0,
        "connected": connected / len(molecules),
        "valid_and_connected": valid_connected / len(molecules),
        "num_molecules": len(molecules),
        "mean_atoms": atoms / len(molecules),
    }
    if reference_smiles is not None:
        novel = distinct - set(reference_smiles)
        result["novelty"] = len(novel) / len(distinct) if distinct else 0.0
    return result
