"""Small organic molecules as SMILES strings: the built-in data of the molecule sources.

``SMILES`` holds neutral, closed-shell molecules of the elements H, C, N, O and F with at most
nine heavy (non-hydrogen) atoms, as in QM9: alkanes, alkenes and alkynes, small rings, alcohols,
ethers, carbonyls, acids and esters, amines, imines, amides and ureas, nitriles, fluorinated
compounds, aromatic and heteroaromatic rings, and amino acids. Each is written without
stereochemistry and parses in RDKit; no two share a canonical SMILES.
:class:`~diffusion_jax.data.molecules.SmilesMolecules` gives them hydrogens and 3-D conformers.
"""

__all__ = ["SMILES"]

SMILES = (
    # Alkanes
    "C", "CC", "CCC", "CCCC", "CC(C)C", "CCCCC", "CC(C)CC", "CC(C)(C)C", "CCCCCC", "CC(C)CCC",
    "CC(C)C(C)C", "CCCCCCC", "CCCCCCCCC",
    # Alkenes, alkynes, cumulenes
    "C=C", "CC=C", "CC=CC", "C=C(C)C", "C=CC=C", "CC=CCC", "C=CCC=C", "CC(=C)C=C", "C=C=C", "C#C",
    "CC#C", "CCC#C", "CC#CC", "C#CC#C", "C#CC=C", "CC(C)C#C",
    # Rings
    "C1CC1", "CC1CC1", "C1CCC1", "C1CCCC1", "C1CCCCC1", "CC1CCCCC1", "C1=CCC1", "C1=CCCC1",
    "C1=CCCCC1", "C1=CC=CC1", "C1=CCC=CC1", "C1CC2CC2C1", "C1CC2CCC1C2", "C1CC2CC1C2",
    "C1CCC2CCCC2C1", "C1CC1C1CC1",
    # Alcohols
    "CO", "CCO", "CCCO", "CC(C)O", "CCCCO", "CC(C)(C)O", "OCCO", "OCC(O)CO", "OCC(O)C(O)CO",
    "CC(O)CO", "OC1CCCCC1", "OC1CCC1", "C=CCO", "C#CCO",
    # Ethers
    "COC", "CCOC", "COCCO", "C1CO1", "C1COC1", "C1CCOC1", "C1CCOCC1", "C1COCCO1", "C1COCO1",
    "C=COC", "COC(C)(C)C",
    # Aldehydes, ketones
    "C=O", "CC=O", "CCC=O", "O=CC=O", "C=CC=O", "CC=CC=O", "OCC=O", "CC(=O)C", "CCC(C)=O",
    "CCC(=O)CC", "CC(=O)C(C)=O", "CC(=O)CC(C)=O", "C=CC(C)=O", "O=C1CCC1", "O=C1CCCC1",
    "O=C1CCCCC1", "O=C1C=CCC1", "OCC(=O)CO", "OCC(O)C=O", "C=C=O",
    # Acids, esters, carbonates
    "OC=O", "CC(=O)O", "CCC(=O)O", "OC(=O)C(=O)O", "OC(=O)CC(=O)O", "OC(=O)CCC(=O)O",
    "CC(O)C(=O)O", "CC(=O)C(=O)O", "OCC(=O)O", "C=CC(=O)O", "O=C(O)C=CC(=O)O", "COC=O", "CCOC=O",
    "COC(C)=O", "CCOC(C)=O", "COC(=O)OC", "O=C1OCCO1", "O=C1CCO1", "O=C1CCCO1",
    # Amines, imines, hydrazines, hydroxylamines
    "N", "CN", "CCN", "CNC", "CN(C)C", "CC(C)N", "CC(C)(C)N", "NCCN", "NCCO", "C1CN1", "C1CCNC1",
    "C1CCNCC1", "C1CNCCN1", "C1COCCN1", "C1CN2CCN1CC2", "NC1CC1", "C=N", "CC=N", "CN=C", "CC(C)=N",
    "NN", "CNN", "CN=NC", "NO", "CNO", "CON", "C=NO", "CC=NO",
    # Amides, ureas, related
    "NC=O", "CNC=O", "CN(C)C=O", "CC(N)=O", "CNC(C)=O", "C=CC(N)=O", "NC(=O)C(N)=O", "NC(N)=O",
    "CNC(N)=O", "NC(=O)NC(N)=O", "NNC(N)=O", "NC(=O)O", "COC(N)=O", "O=C1CCN1", "O=C1CCCN1",
    "O=C1NCCN1", "O=C1NC(=O)CN1", "O=C1CNC(=O)CN1", "NC(N)=N", "CC(N)=N",
    # Nitriles, cyanamides
    "C#N", "CC#N", "CCC#N", "C=CC#N", "N#CC#N", "N#CCC#N", "NCC#N", "OCC#N", "CC(C)(O)C#N", "NC#N",
    "N#CN=C(N)N",
    # Fluorinated
    "CF", "FCF", "FC(F)F", "FC(F)(F)F", "CCF", "FCCF", "CC(F)(F)F", "FC=C", "FC(F)=C(F)F", "FC#C",
    "OCC(F)(F)F", "NCC(F)(F)F", "OC(=O)C(F)(F)F", "OC(=O)CF", "CC(=O)F", "O=CF", "O=C(F)F",
    "CC(=O)CF", "FN(F)F", "FC(F)(F)C#N", "FC1CC1", "FC1(F)CC1",
    # Aromatics (six-membered)
    "c1ccccc1", "Cc1ccccc1", "C=Cc1ccccc1", "Oc1ccccc1", "Nc1ccccc1", "Fc1ccccc1", "Fc1ccc(F)cc1",
    "Oc1ccc(O)cc1", "COc1ccccc1", "O=Cc1ccccc1", "OCc1ccccc1", "N#Cc1ccccc1", "OC(=O)c1ccccc1",
    "c1ccncc1", "Cc1ccccn1", "Nc1ccccn1", "Oc1cccnc1", "c1ccnnc1", "c1cncnc1", "c1cnccn1",
    "c1ncncn1", "O=c1cc[nH]c(=O)[nH]1", "Nc1cc[nH]c(=O)n1", "Cc1c[nH]c(=O)[nH]c1=O",
    "O=c1cccc[nH]1",
    # Five-membered aromatics and fused
    "c1cc[nH]c1", "c1ccoc1", "Cc1ccco1", "O=Cc1ccco1", "O=Cc1ccc[nH]1", "Cn1cccc1", "c1c[nH]cn1",
    "Cn1ccnc1", "c1cn[nH]c1", "c1cocn1", "c1cnoc1", "Cc1ccon1", "c1nc[nH]n1", "c1nn[nH]n1",
    "c1nnco1", "c1ncon1", "Nc1ncc[nH]1", "c1ccc2[nH]ccc2c1", "c1ccc2occc2c1", "c1ncc2nc[nH]c2n1",
    # Amino acids and bio-like
    "NCC(=O)O", "CC(N)C(=O)O", "NC(CO)C(=O)O", "CC(C)C(N)C(=O)O", "OC(=O)C1CCCN1",
    "NC(CC(=O)O)C(=O)O", "NCCC(=O)O", "CC(=O)NCC(=O)O", "OCC(O)C(O)C=O",
)
