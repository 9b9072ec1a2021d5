"""SMILES → a sanitised RDKit molecule, or the reason there is none (shared by the graph,
fingerprint and descriptor featurizers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from meddx.errors import DataError

__all__ = ["MolParse", "parse_smiles", "require_mol"]


@dataclass
class MolParse:
    """Outcome of parsing one SMILES: a molecule, or the reason there is none."""

    smiles: str
    mol: Any | None
    reason: str | None = None


def _quiet_rdkit() -> None:
    from rdkit import RDLogger

    RDLogger.DisableLog("rdApp.*")  # we report the reason ourselves, once, with the row


def parse_smiles(smiles: Any) -> MolParse:
    """Parse and sanitise one SMILES; never raises (see :func:`require_mol`)."""
    from rdkit import Chem

    _quiet_rdkit()
    if smiles is None or (isinstance(smiles, float) and np.isnan(smiles)):
        return MolParse("", None, "empty SMILES")
    if not isinstance(smiles, str):
        return MolParse(str(smiles), None, f"SMILES must be text, got {type(smiles).__name__}")
    text = smiles.strip()
    if not text:
        return MolParse(text, None, "empty SMILES")
    mol = Chem.MolFromSmiles(text, sanitize=False)
    if mol is None:
        return MolParse(text, None, "SMILES syntax error")
    try:
        Chem.SanitizeMol(mol)
    except Exception as e:  # RDKit raises several unrelated classes (valence, kekulize …)
        return MolParse(text, None, f"RDKit sanitisation failed: {e}".strip())
    if mol.GetNumAtoms() == 0:
        return MolParse(text, None, "SMILES has no atoms")
    if all(a.GetAtomicNum() == 0 for a in mol.GetAtoms()):
        return MolParse(text, None, "SMILES has only wildcard atoms (*)")
    return MolParse(text, mol)


def require_mol(smiles: Any, name: str | None = None) -> Any:
    """The sanitised RDKit molecule of ``smiles``, or a DataError naming the input."""
    parsed = parse_smiles(smiles)
    if parsed.mol is None:
        shown = name or (repr(parsed.smiles) if parsed.smiles else "(empty)")
        raise DataError(f"invalid SMILES {shown}: {parsed.reason}", sample_id=name,
                        hint="check the SMILES (e.g. draw it in a structure editor); "
                        "wildcard-only and empty inputs cannot be predicted")
    return parsed.mol
