"""Molecules: SMILES to RDKit graphs (Chemprop D-MPNN) or fingerprints; toxicity and property tasks.

What this folder registers (strings: nothing is imported until it is used). See
:mod:`meddx.modalities` for how these are read.
"""

MODALITIES = {
    "molecule": "meddx.modalities.molecule.modality:MoleculeModality",
}
NETWORKS = {
    "dmpnn": "meddx.modalities.molecule.networks:dmpnn",
    "ecfp_mlp": "meddx.modalities.molecule.networks:ecfp_mlp",
}
CDS_ADAPTERS = {}
COMMANDS = None
