"""Molecule data: the SMILES list, encoding to records, .xyz/.sdf files and the two sources."""

import ast
import os
import pathlib
import sys

import numpy as np
import pytest

from diffusion_jax.data import molecule_files, molecules
from diffusion_jax.data.molecule_files import (
    ATOMIC_NUMBERS,
    ELEMENTS,
    read_molecules,
    read_sdf,
    read_xyz,
)
from diffusion_jax.data.molecules import (
    MoleculeFolder,
    SmilesMolecules,
    decode,
    encode,
    random_rotation,
)
from diffusion_jax.data.smiles import SMILES
from diffusion_jax.set_files import write_sdf, write_xyz, write_xyz_frames
from diffusion_jax.data.sources import DataError

WATER = (["O", "H", "H"], np.array([[0.0, 0.0, 0.1173], [0.0, 0.7572, -0.4692],
                                    [0.0, -0.7572, -0.4692]]))
METHANOL = (["C", "O", "H", "H", "H", "H"],
            np.array([[-0.0468, 0.6637, 0.0], [-0.0468, -0.7578, 0.0], [-1.0869, 0.9813, 0.0],
                      [0.4383, 1.0725, 0.8905], [0.4383, 1.0725, -0.8905],
                      [0.8636, -1.0809, 0.0]]))


def _pairwise(positions):
    return np.linalg.norm(positions[:, None] - positions[None, :], axis=-1)


# --- the SMILES list ---------------------------------------------------------------------------

def test_the_smiles_list_is_valid_unique_small_neutral_and_without_stereo():
    Chem = pytest.importorskip("rdkit.Chem")
    assert 150 <= len(SMILES) <= 250
    canonical = {}
    for text in SMILES:
        mol = Chem.MolFromSmiles(text)
        assert mol is not None, text
        assert not set("/\\@") & set(text), text
        assert mol.GetNumAtoms() <= 9, text
        with_h = Chem.AddHs(mol)
        assert {a.GetSymbol() for a in with_h.GetAtoms()} <= set(ELEMENTS), text
        assert all(a.GetFormalCharge() == 0 and a.GetNumRadicalElectrons() == 0
                   for a in mol.GetAtoms()), text
        key = Chem.MolToSmiles(mol)
        assert key not in canonical, f"{text} and {canonical.get(key)} are the same molecule"
        canonical[key] = text
    # Diverse: every element and the common groups occur.
    assert {e for t in SMILES for e in "CNOF" if e in t.upper()} == {"C", "N", "O", "F"}
    assert any("#N" in t for t in SMILES) and any("c1" in t for t in SMILES)


def test_rdkit_is_imported_only_inside_functions():
    """RDKit is an optional extra: the modules import without it."""
    root = pathlib.Path(__file__).resolve().parents[1] / "diffusion_jax"
    for name in ("data/molecule_files.py", "data/molecules.py", "data/smiles.py",
                 "molecule_eval.py"):
        tree = ast.parse((root / name).read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        modules = [a.name for n in top if isinstance(n, ast.Import) for a in n.names] + [
            n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        assert not [m for m in modules if m.split(".")[0] == "rdkit"], name


def test_without_rdkit_the_errors_say_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "rdkit", None)
    (tmp_path / "a.sdf").write_text("")
    for call in (lambda: read_sdf(str(tmp_path / "a.sdf")), lambda: SmilesMolecules(10),
                 lambda: write_sdf(str(tmp_path / "b.sdf"), [])):
        with pytest.raises(DataError, match=r'pip install -e "\.\[molecules\]"'):
            call()
    # .xyz files and encoding need no RDKit.
    write_xyz(str(tmp_path / "w.xyz"), *WATER)
    assert read_xyz(str(tmp_path / "w.xyz"))[0][0] == ["O", "H", "H"]


# --- encode and decode -------------------------------------------------------------------------

def test_encode_centres_pads_and_one_hot_encodes():
    symbols, positions = METHANOL
    x, mask = encode(symbols, positions + 5.0, ELEMENTS, max_atoms=9, feature_scale=0.25)
    assert x.shape == (9, 8) and x.dtype == np.float32 and mask.dtype == np.float32
    np.testing.assert_array_equal(mask, [1] * 6 + [0] * 3)
    assert not x[6:].any()
    assert np.abs(x[:6, :3].mean(axis=0)).max() < 1e-6
    np.testing.assert_allclose(x[:6, :3], positions - positions.mean(0), atol=1e-6)
    expected = np.zeros((6, 5), np.float32)
    expected[np.arange(6), [1, 3, 0, 0, 0, 0]] = 0.25
    np.testing.assert_array_equal(x[:6, 3:], expected)
    x2, _ = encode(symbols, positions, ("C", "H", "O"), max_atoms=6, feature_scale=1.0)
    np.testing.assert_array_equal(x2[:, 3:].argmax(-1), [0, 2, 1, 1, 1, 1])
    assert set(np.unique(x2[:, 3:])) == {0.0, 1.0}


def test_encode_rotates_by_a_proper_rotation_and_keeps_the_shape():
    symbols, positions = METHANOL
    x, _ = encode(symbols, positions, ELEMENTS, 6, rng=np.random.default_rng(1))
    plain, _ = encode(symbols, positions, ELEMENTS, 6)
    assert np.abs(x[:, :3] - plain[:, :3]).max() > 0.1  # turned
    np.testing.assert_allclose(_pairwise(x[:, :3]), _pairwise(positions), atol=1e-5)
    assert np.abs(x[:, :3].mean(0)).max() < 1e-6
    rotations = np.stack([random_rotation(np.random.default_rng([7, i])) for i in range(2000)])
    np.testing.assert_allclose(rotations @ rotations.transpose(0, 2, 1),
                               np.broadcast_to(np.eye(3), (2000, 3, 3)), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(rotations), 1.0, atol=1e-12)
    # Uniform: each column averages to zero (standard error 0.013) and the trace to 0.
    assert np.abs(rotations.mean(0)).max() < 0.06


def test_encode_names_what_is_wrong():
    symbols, positions = ["C"] * 31, np.arange(93.0).reshape(31, 3)
    with pytest.raises(DataError, match=r"molecule with 31 atoms; the model takes at most "
                                        r"config\.data\.max_atoms=29"):
        encode(symbols, positions, ELEMENTS, 29)
    with pytest.raises(DataError, match=r"big\.xyz: molecule with 31 atoms"):
        encode(symbols, positions, ELEMENTS, 29, where="big.xyz")
    with pytest.raises(DataError, match=r"salt\.xyz: the molecule has Cl atoms.*"
                                        r"config\.data\.elements"):
        encode(["C", "Cl"], np.zeros((2, 3)), ELEMENTS, 29, where="salt.xyz")
    with pytest.raises(DataError, match="config.data.elements"):
        encode(["C"], np.zeros((1, 3)), ("C", "Xx"), 29)
    with pytest.raises(DataError, match="config.data.max_atoms"):
        encode(["C"], np.zeros((1, 3)), ELEMENTS, 0)
    with pytest.raises(ValueError, match="one symbol per atom"):
        encode(["C", "H"], np.zeros((3, 3)), ELEMENTS, 29)


def test_decode_inverts_encode_for_a_batch():
    batch = [encode(s, p, ELEMENTS, 8) for s, p in (WATER, METHANOL)]
    x, mask = np.stack([b[0] for b in batch]), np.stack([b[1] for b in batch])
    decoded = decode(x, mask, ELEMENTS)
    for (symbols, positions), (want_symbols, want_positions) in zip(decoded, (WATER, METHANOL)):
        assert symbols == want_symbols and positions.dtype == np.float64
        np.testing.assert_allclose(positions, want_positions - want_positions.mean(0), atol=1e-6)
    noisy = x + np.random.default_rng(0).normal(0, 0.05, x.shape).astype(np.float32)
    assert [s for s, _ in decode(noisy, mask, ELEMENTS)] == [WATER[0], METHANOL[0]]
    assert decode(x[1], mask[1], ELEMENTS)[0][0] == METHANOL[0]
    with pytest.raises(ValueError, match="atom types"):
        decode(x, mask, ("C", "H"))


# --- .xyz files --------------------------------------------------------------------------------

def test_xyz_files_round_trip_with_several_molecules(tmp_path):
    path = str(tmp_path / "two.xyz")
    write_xyz_frames(path, [WATER, METHANOL], ["water", "methanol\nsecond line"])
    read = read_xyz(path)
    assert [s for s, _ in read] == [WATER[0], METHANOL[0]]
    for (_, positions), (_, want) in zip(read, (WATER, METHANOL)):
        assert positions.dtype == np.float64
        np.testing.assert_allclose(positions, want, atol=1e-8)
    assert open(path).read().splitlines()[:2] == ["3", "water"]
    assert "methanol second line" in open(path).read()
    write_xyz(path, *WATER, comment="overwritten")
    assert len(read_xyz(path)) == 1 and read_molecules(path)[0][0] == WATER[0]
    assert sorted(os.listdir(tmp_path)) == ["two.xyz"]  # no temporary file left behind


def test_xyz_reading_takes_extra_columns_numbers_case_and_qm9_files(tmp_path):
    path = tmp_path / "odd.xyz"
    path.write_text("2\n\n8 0 0 0.1 extra\nh 0 0 1.0 x y\n\n1\ncomment\nCL 1 2 3\n\n")
    (first, p1), (second, p2) = read_xyz(str(path))
    assert first == ["O", "H"] and second == ["Cl"]
    np.testing.assert_array_equal(p2, [[1, 2, 3]])
    qm9 = tmp_path / "dsgdb9nsd_000001.xyz"
    qm9.write_text("5\ngdb 1\t157.7\t157.7\t157.7\n"
                   "C\t-1.2698136*^-2\t 1.085804\t 8.001*^-3\t-0.535689\n"
                   "H\t 2.1504*^-3\t-6.031*^-3\t 1.9666*^-3\t 0.133921\n"
                   "H\t 1.011731\t 1.463751\t 2.76*^-4\t 0.133922\n"
                   "H\t-0.540815\t 1.447527\t-0.876644\t 0.133923\n"
                   "H\t-0.523814\t 1.437933\t 0.906397\t 0.133923\n"
                   "1341.307\t1341.3284\t1341.365\t1562.6731\t1562.7453\t3038.3205\n"
                   "C\tC\n"
                   "InChI=1S/CH4/h1H4\tInChI=1S/CH4/h1H4\n")
    ((symbols, positions),) = read_xyz(str(qm9))
    assert symbols == ["C", "H", "H", "H", "H"]
    np.testing.assert_allclose(positions[0], [-1.2698136e-2, 1.085804, 8.001e-3])


@pytest.mark.parametrize("text, line, words", [
    ("x\n\nC 0 0 0\n", 1, "atom count"),
    ("0\n\n", 1, "atom count"),
    ("2.5\n\nC 0 0 0\nC 0 0 1\n", 1, "atom count"),
    ("3\ncomment\nC 0 0 0\nH 0 0 1\n", 1, "ends after 2 atom lines"),
    ("1\n\nC 0 0 0\n2\n\nH 0 0 0\n", 4, "ends after 1 atom lines"),
    ("2\n\nC 0 0 0\nH 0 zero 1\n", 4, "not a number"),
    ("2\n\nC 0 0 0\nH 0 0\n", 4, "should be an atom"),
    ("1\n\nXx 0 0 0\n", 3, "'Xx', which is not an element"),
    ("1\n\n200 0 0 0\n", 3, "'200'"),
    ("1\n\nC nan 0 0\n", 3, "not finite"),
])
def test_malformed_xyz_files_name_the_file_and_line(tmp_path, text, line, words):
    path = tmp_path / "broken.xyz"
    path.write_text(text)
    with pytest.raises(DataError) as caught:
        read_xyz(str(path))
    message = str(caught.value)
    assert str(path) in message and f"line {line} " in message and words in message, message


def test_empty_and_missing_xyz_files(tmp_path):
    (tmp_path / "empty.xyz").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.xyz holds no molecule"):
        read_xyz(str(tmp_path / "empty.xyz"))
    with pytest.raises(FileNotFoundError):
        read_xyz(str(tmp_path / "missing.xyz"))
    with pytest.raises(DataError, match=r"must end in \.xyz or \.sdf"):
        read_molecules(str(tmp_path / "a.pdb"))


# --- .sdf files --------------------------------------------------------------------------------

def _embedded(smiles, seed=0):
    Chem = pytest.importorskip("rdkit.Chem")
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    assert AllChem.EmbedMolecule(mol, params) == 0
    return mol


def test_sdf_files_round_trip_even_for_molecules_that_break_valence_rules(tmp_path):
    Chem = pytest.importorskip("rdkit.Chem")
    ethanol, urea = _embedded("CCO"), _embedded("NC(N)=O")
    broken = Chem.RWMol(_embedded("C"))  # a carbon with five bonds: RDKit cannot sanitize it
    broken.AddAtom(Chem.Atom("H"))
    broken.AddBond(0, 5, Chem.BondType.SINGLE)
    conformer = broken.GetConformer()
    conformer.SetAtomPosition(5, (1.5, 1.5, 1.5))
    broken = broken.GetMol()
    path = str(tmp_path / "out.sdf")
    write_sdf(path, [ethanol, urea, broken])
    assert sorted(os.listdir(tmp_path)) == ["out.sdf"]
    read = read_sdf(path)
    assert len(read) == 3
    for (symbols, positions), mol in zip(read, (ethanol, urea, broken)):
        assert symbols == [a.GetSymbol() for a in mol.GetAtoms()]
        np.testing.assert_allclose(positions, mol.GetConformer().GetPositions(), atol=1e-4)
    assert read_molecules(path)[2][0] == ["C", "H", "H", "H", "H", "H"]
    with pytest.raises(ValueError, match="no conformer"):
        write_sdf(path, [Chem.MolFromSmiles("CC")])


def test_bad_sdf_files_name_the_file_and_record(tmp_path):
    pytest.importorskip("rdkit")
    good = tmp_path / "good.sdf"
    write_sdf(str(good), [_embedded("CO"), _embedded("CC")])
    records = good.read_text().split("$$$$\n")
    broken = tmp_path / "broken.sdf"
    damaged = records[1].splitlines()
    damaged[3] = "  9  8  0  0  0  0  0  0  0  0999 V2000"  # more atoms than the block has
    broken.write_text(records[0] + "$$$$\n" + "\n".join(damaged) + "\n$$$$\n")
    with pytest.raises(DataError, match=r"record 2 \(counting from 1\) of the \.sdf file "
                                        + str(broken).replace(".", r"\.")):
        read_sdf(str(broken))
    garbage = tmp_path / "garbage.sdf"
    garbage.write_text("this is not\na molecule\n")
    with pytest.raises(DataError, match=r"record 1 .*garbage\.sdf"):
        read_sdf(str(garbage))
    empty = tmp_path / "empty.sdf"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.sdf holds no molecule"):
        read_sdf(str(empty))
    with pytest.raises(FileNotFoundError):
        read_sdf(str(tmp_path / "missing.sdf"))


# --- SmilesMolecules ---------------------------------------------------------------------------

def test_smiles_records_are_deterministic_centred_conformers():
    Chem = pytest.importorskip("rdkit.Chem")
    source = SmilesMolecules(size=1000, seed=3)
    again, other = SmilesMolecules(size=1000, seed=3), SmilesMolecules(size=1000, seed=4)
    assert source.num_molecules == len(SMILES) and len(source) == 1000
    counts = source.atom_counts()
    assert counts.shape == (1000,) and counts.max() <= 29
    for i in (0, 7, len(SMILES) + 7, 999, -1):
        record = source[i]
        assert set(record) == {"x", "mask"}
        x, mask = record["x"], record["mask"]
        assert x.shape == (29, 8) and x.dtype == np.float32 and mask.dtype == np.float32
        np.testing.assert_array_equal(x, again[i]["x"])
        n = int(mask.sum())
        assert n == counts[i] and (mask[:n] == 1).all() and not x[n:].any()
        assert np.abs(x[:n, :3].mean(0)).max() < 1e-5
        assert set(np.unique(x[:n, 3:])) == {0.0, 0.25} and (x[:n, 3:].sum(1) == 0.25).all()
        ((symbols, positions),) = decode(x, mask, ELEMENTS)
        mol = Chem.AddHs(Chem.MolFromSmiles(source.smiles(i)))
        assert sorted(symbols) == sorted(a.GetSymbol() for a in mol.GetAtoms())
        # A relaxed conformer: no two atoms closer than an H-H bond; each H bonded to something.
        distances = _pairwise(positions) + 10 * np.eye(n)
        assert distances.min() > 0.7
        hydrogens = [k for k, s in enumerate(symbols) if s == "H"]
        assert (distances[hydrogens].min(1) < 1.12).all()
    assert not np.array_equal(source[7]["x"], source[7 + len(SMILES)]["x"])  # a new conformer
    assert not np.array_equal(source[0]["x"], other[0]["x"])
    assert source.smiles(7) == source.smiles(7 + len(SMILES))
    assert repr(source).startswith("SmilesMolecules(size=1000, max_atoms=29, elements=('H', ")
    with pytest.raises(IndexError):
        source[1000]


def test_smiles_molecules_keep_only_those_that_fit():
    pytest.importorskip("rdkit")
    source = SmilesMolecules(size=10, smiles=["C", "CCO", "CCCCCCCCC", "CCl", "c1ccccc1"],
                             max_atoms=12, max_heavy_atoms=6)
    assert source.num_molecules == 3  # nonane has 29 atoms, chloromethane Cl
    assert [source.smiles(i) for i in range(4)] == ["C", "CCO", "c1ccccc1", "C"]
    np.testing.assert_array_equal(source.atom_counts()[:4], [5, 9, 12, 5])
    assert source[2]["x"].shape == (12, 8)
    with pytest.raises(DataError) as caught:
        SmilesMolecules(size=10, smiles=["CCCCCCCCC", "CCl"], max_atoms=12)
    message = str(caught.value)
    assert "config.data.max_atoms=12" in message and "Cl" in message
    assert "config.data.elements" in message
    with pytest.raises(DataError, match=r"SMILES 1 of the list, 'C1CC', does not parse"):
        SmilesMolecules(size=10, smiles=["C", "C1CC"])
    with pytest.raises(DataError, match="config.data.max_heavy_atoms"):
        SmilesMolecules(size=10, max_heavy_atoms=0)


# --- MoleculeFolder ----------------------------------------------------------------------------

def _folder(tmp_path):
    """A folder with good, bad and hidden molecule files."""
    root = tmp_path / "molecules"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    write_sdf(str(root / "a_urea.SDF"), [_embedded("NC(N)=O")])
    write_xyz(str(root / "b_water.xyz"), *WATER)
    write_xyz(str(root / "c_big.xyz"), ["C"] * 12 + ["H"] * 20, np.arange(96.0).reshape(32, 3))
    write_xyz(str(root / "d_chlorine.xyz"), ["C", "Cl"], [[0, 0, 0], [1.8, 0, 0]])
    (root / "e_broken.xyz").write_text("2\n\nC 0 0 0\n")
    write_xyz_frames(str(root / "sub" / "pair.XYZ"), [METHANOL, WATER])
    (root / ".f_hidden.xyz").write_text("garbage")
    (root / ".hidden" / "g.xyz").write_text("garbage")
    (root / "notes.txt").write_text("not a molecule")
    return root


def test_a_folder_keeps_the_good_molecules_and_logs_the_bad_files(tmp_path):
    pytest.importorskip("rdkit")
    root = _folder(tmp_path)
    logged = []
    source = MoleculeFolder(str(root), max_atoms=29, seed=1, log=logged.append)
    assert len(source) == 4  # urea, water, and the methanol and water of the pair
    assert [source.file(i) for i in range(4)] == [str(root / "a_urea.SDF"),
                                                 str(root / "b_water.xyz"),
                                                 str(root / "sub" / "pair.XYZ"),
                                                 str(root / "sub" / "pair.XYZ")]
    np.testing.assert_array_equal(source.atom_counts(), [8, 3, 6, 3])
    assert source.molecule(2)[0] == METHANOL[0]
    assert logged[:3] == [
        "MoleculeFolder: skipped c_big.xyz: molecule with 32 atoms; the model takes at most "
        "config.data.max_atoms=29: raise config.data.max_atoms to 32 or more, or leave the "
        "molecule out",
        "MoleculeFolder: skipped d_chlorine.xyz: the molecule has Cl atoms, outside the atom "
        "types config.data.elements=('H', 'C', 'N', 'O', 'F'): add Cl to config.data.elements, "
        "or leave the molecules holding them out",
        f"MoleculeFolder: skipped e_broken.xyz: cannot read the .xyz file {root}/e_broken.xyz: "
        "line 1 gives a molecule of 2 atoms, but the file ends after 1 atom lines; an .xyz file "
        "holds, for each molecule, a line with its atom count, a comment line, and one line "
        "'symbol x y z' per atom: repair the file or remove it"]
    assert logged[3:] == [f"MoleculeFolder: skipped 3 of 6 files in {root} (the reasons are "
                          "above); read 4 molecules from the others"]
    record = source[2]
    assert record["x"].shape == (29, 8) and record["mask"].sum() == 6
    np.testing.assert_array_equal(record["x"], source[2]["x"])
    np.testing.assert_allclose(_pairwise(record["x"][:6, :3]), _pairwise(METHANOL[1]),
                               atol=1e-5)
    assert np.abs(record["x"][:6, :3].mean(0)).max() < 1e-5
    np.testing.assert_array_equal(record["x"][:6, 3:].argmax(1), [1, 3, 0, 0, 0, 0])
    other = MoleculeFolder(str(root), max_atoms=29, seed=2, log=lambda line: None)
    assert not np.allclose(other[2]["x"], record["x"])  # another rotation
    with pytest.raises(IndexError):
        source[4]


def test_a_multi_molecule_file_loses_only_its_unfit_molecules(tmp_path):
    path = tmp_path / "set.xyz"
    write_xyz_frames(str(path), [WATER, (["C"] * 30, np.eye(30, 3)), METHANOL])
    logged = []
    source = MoleculeFolder(str(tmp_path), max_atoms=29, log=logged.append)
    assert len(source) == 2 and source.atom_counts().tolist() == [3, 6]
    assert logged == ["MoleculeFolder: left out 1 of the 3 molecules of set.xyz: molecule 2 of "
                      "set.xyz: molecule with 30 atoms; the model takes at most "
                      "config.data.max_atoms=29: raise config.data.max_atoms to 30 or more, "
                      "or leave the molecule out"]
    assert "elements=('H', 'C', 'N', 'O', 'F')" in repr(source)


def test_folders_without_usable_molecules_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("")
    with pytest.raises(DataError, match=r"holds no molecule files.*\.xyz and \.sdf"):
        MoleculeFolder(str(tmp_path / "empty"), max_atoms=29)
    with pytest.raises(DataError, match="does not exist"):
        MoleculeFolder(str(tmp_path / "nowhere"), max_atoms=29)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.xyz").write_text("1\n\nQq 0 0 0\n")
    (tmp_path / "bad" / "b.sdf").write_text("not an sdf\n")
    logged = []
    with pytest.raises(DataError, match=r"none of the 2 molecule files .* a\.xyz"):
        MoleculeFolder(str(tmp_path / "bad"), max_atoms=29, log=logged.append)
    assert len(logged) == 2 and "a.xyz" in logged[0] and "b.sdf" in logged[1]


def test_the_periodic_table_and_the_default_elements():
    assert ELEMENTS == ("H", "C", "N", "O", "F")
    assert [ATOMIC_NUMBERS[s] for s in ("H", "C", "N", "O", "F", "Cl", "Br", "I")] == [
        1, 6, 7, 8, 9, 17, 35, 53]
    assert molecule_files.element_symbol("CL") == "Cl" and molecule_files.element_symbol("6") == "C"
    assert molecule_files.element_symbol("Qq") is None and molecules.ELEMENTS == ELEMENTS
