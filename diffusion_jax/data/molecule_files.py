"""Molecule files: reading .xyz and .sdf files of 3-D molecules.

A molecule is read as ``(symbols, positions)``: a list of element symbols ("C", "Cl", ...) and
float64 positions ``[n, 3]`` in Ångström, hydrogens included as the file has them.

An .xyz file holds one molecule or several, one after the other, each as a line with its atom
count, a comment line, and one line per atom: an element symbol (or an atomic number) and the
x, y and z coordinates; columns after those are ignored. Symbols are read in any letter case
("CL" is chlorine), and coordinates may use Mathematica's exponent ``*^`` as QM9's files do. A
file whose comment line starts with "gdb" is one of QM9's: its single molecule is read and the
lines after it (frequencies, SMILES, InChI) are left alone. An .sdf file is read by RDKit, record
by record, without sanitizing, so that every record written with coordinates is read as it is.
A damaged file raises :class:`~diffusion_jax.data.sources.DataError` naming the file and the
line (or record) where reading stopped.

The writers of these files are in :mod:`diffusion_jax.set_files`. RDKit is an optional
dependency, needed for .sdf files only.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np

from diffusion_jax.data.sources import DataError

__all__ = ["ATOMIC_NUMBERS", "ELEMENTS", "MOLECULE_EXTENSIONS", "RDKIT_INSTALL", "element_symbol",
           "rdkit_chem", "read_molecules", "read_sdf", "read_xyz"]

ELEMENTS = ("H", "C", "N", "O", "F")
_SYMBOLS = (
    "H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se "
    "Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb "
    "Dy Ho Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am Cm "
    "Bk Cf Es Fm Md No Lr Rf Db Sg Bh Hs Mt Ds Rg Cn Nh Fl Mc Lv Ts Og").split()
# The periodic table: element symbol -> atomic number.
ATOMIC_NUMBERS = {symbol: number for number, symbol in enumerate(_SYMBOLS, start=1)}
RDKIT_INSTALL = 'pip install -e ".[molecules]"` (or `pip install rdkit`)'
MOLECULE_EXTENSIONS = (".xyz", ".sdf")


def rdkit_chem(purpose: str):
    """RDKit's ``Chem`` module, or a DataError saying that ``purpose`` needs RDKit to install."""
    try:
        from rdkit import Chem
    except ImportError as err:
        raise DataError(f"{purpose} needs RDKit: `{RDKIT_INSTALL}") from err
    return Chem


def element_symbol(token: str) -> Optional[str]:
    """The element symbol a file writes as ``token`` ("c", "CL", "6"), or None if none is."""
    if token.isdecimal():
        number = int(token)
        return _SYMBOLS[number - 1] if 1 <= number <= len(_SYMBOLS) else None
    symbol = token.capitalize()
    return symbol if symbol in ATOMIC_NUMBERS else None


def _xyz_error(path: str, line: int, what: str) -> DataError:
    """A DataError for the .xyz file ``path``, naming the line where reading stopped."""
    return DataError(f"cannot read the .xyz file {path}: line {line} {what}; an .xyz file holds, "
                     "for each molecule, a line with its atom count, a comment line, and one line "
                     "'symbol x y z' per atom: repair the file or remove it")


def _atom_count(path: str, text: str, line: int) -> int:
    """The atom count on line ``line`` of an .xyz file (``text``), or a DataError."""
    fields = text.split()
    if len(fields) != 1 or not fields[0].isdecimal() or int(fields[0]) < 1:
        raise _xyz_error(path, line, f"should hold a molecule's atom count (a whole number >= 1) "
                                     f"but reads {text.strip()!r}")
    return int(fields[0])


def _atom(path: str, text: str, line: int) -> tuple:
    """``(symbol, [x, y, z])`` from line ``line`` (``text``) of an .xyz file, or a DataError."""
    fields = text.split()
    if len(fields) < 4:
        raise _xyz_error(path, line, f"should be an atom 'symbol x y z' but reads {text.strip()!r}")
    symbol = element_symbol(fields[0])
    if symbol is None:
        raise _xyz_error(path, line, f"names the element {fields[0]!r}, which is not an element "
                                     "symbol or atomic number")
    try:
        xyz = [float(value.replace("*^", "e")) for value in fields[1:4]]
    except ValueError:
        raise _xyz_error(path, line, f"has a coordinate that is not a number: "
                                     f"{text.strip()!r}") from None
    if not all(math.isfinite(value) for value in xyz):
        raise _xyz_error(path, line, f"has a coordinate that is not finite: {text.strip()!r}")
    return symbol, xyz


def read_xyz(path: str) -> list:
    """The molecules of an .xyz file, each ``(symbols, positions float64 [n, 3])``.

    Blank lines between molecules and at the end are skipped. A missing file raises
    ``FileNotFoundError``; a damaged one (a bad count, too few atom lines, a coordinate that is
    not a number, an unknown element, no molecule) raises a DataError naming the file and line.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    qm9 = len(lines) > 1 and lines[1].startswith("gdb")
    molecules, at = [], 0
    while at < len(lines):
        if not lines[at].strip():
            at += 1
            continue
        count = _atom_count(path, lines[at], at + 1)
        if at + 2 + count > len(lines):
            found = max(0, len(lines) - at - 2)
            raise _xyz_error(path, at + 1, f"gives a molecule of {count} atoms, but the file ends "
                                           f"after {found} atom lines")
        atoms = [_atom(path, lines[at + 2 + k], at + 3 + k) for k in range(count)]
        molecules.append(([symbol for symbol, _ in atoms],
                          np.array([xyz for _, xyz in atoms], np.float64)))
        at += 2 + count
        if qm9:
            break
    if not molecules:
        raise DataError(f"the .xyz file {path} holds no molecule (it is empty): write one into "
                        "it or remove it")
    return molecules


def read_sdf(path: str) -> list:
    """The molecules of an .sdf file, each ``(symbols, positions float64 [n, 3])``, by RDKit.

    Records are read without sanitizing and with their hydrogens. A missing file raises
    ``FileNotFoundError``; a record RDKit cannot parse, one whose atoms are not elements (query
    atoms), or a file without records raises a DataError naming the file (and the record).
    """
    Chem = rdkit_chem("reading .sdf files")
    from rdkit import rdBase

    if not os.path.isfile(path):
        raise FileNotFoundError(f"the .sdf file {path} does not exist")
    molecules = []
    with rdBase.BlockLogs():  # RDKit's own messages would repeat ours on stderr
        try:
            supplier = Chem.SDMolSupplier(path, removeHs=False, sanitize=False)
        except OSError as err:  # RDKit refuses empty files with "Invalid input file"
            if os.path.getsize(path) == 0:
                supplier = ()
            else:
                raise DataError(f"RDKit cannot open the .sdf file {path} ({err})") from err
        for index, mol in enumerate(supplier):
            where = f"record {index + 1} (counting from 1) of the .sdf file {path}"
            if mol is None:
                raise DataError(f"RDKit cannot parse {where}: repair the file or remove it")
            symbols = [atom.GetSymbol() for atom in mol.GetAtoms()]
            unknown = sorted({s for s in symbols if s not in ATOMIC_NUMBERS})
            if unknown:
                raise DataError(f"{where} has atoms that are not elements ({', '.join(unknown)}): "
                                "repair the file or remove it")
            if not symbols or mol.GetNumConformers() == 0:
                raise DataError(f"{where} has no atoms with coordinates: repair the file or "
                                "remove it")
            molecules.append((symbols, np.array(mol.GetConformer().GetPositions(), np.float64)))
    if not molecules:
        raise DataError(f"the .sdf file {path} holds no molecule: write one into it or remove it")
    return molecules


def read_molecules(path: str) -> list:
    """The molecules of an .xyz or .sdf file (by its extension, any letter case)."""
    extension = os.path.splitext(path)[1].lower()
    if extension == ".xyz":
        return read_xyz(path)
    if extension == ".sdf":
        return read_sdf(path)
    raise DataError(f"{path} is not a molecule file: its name must end in .xyz or .sdf")
