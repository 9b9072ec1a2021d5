"""Molecule-level RDKit 2D descriptors as extra D-MPNN inputs (Chemprop's ``rdkit_2d``).

Chemprop's D-MPNN reaches its best MoleculeNet figures with ~200 RDKit descriptors appended
to the learned embedding (Yang et al., JCIM 2019). The descriptors are RDKit's own
(``Descriptors.descList``, what Chemprop's ``RDKit2DFeaturizer`` computes); their ranges are
heavy-tailed, so each is log-compressed (sign · log1p |x|), standardised with the training
split's mean and standard deviation (stored in the model card's preprocessing), clipped to
±6, and a value RDKit cannot compute becomes 0 (the training mean).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from meddx.errors import InputMismatchError

__all__ = ["descriptor_count", "raw_descriptors", "fit_scaler", "normalised"]

logger = logging.getLogger(__name__)


def descriptor_count() -> int:
    """Number of RDKit 2D descriptors this RDKit computes."""
    from rdkit.Chem import Descriptors

    return len(Descriptors.descList)


@lru_cache(maxsize=20000)
def raw_descriptors(smiles: str) -> np.ndarray:
    """Log-compressed RDKit 2D descriptors of a (valid) SMILES; NaN where RDKit fails."""
    from rdkit.Chem import Descriptors

    from meddx.modalities.molecule.smiles import require_mol

    mol = require_mol(smiles)
    values = []
    for name, fn in Descriptors.descList:
        try:
            values.append(0.0 if name == "SPS" and mol.GetNumHeavyAtoms() == 0 else float(fn(mol)))
        except (ValueError, ZeroDivisionError, RuntimeError):
            values.append(np.nan)
    x = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        x[~np.isfinite(x)] = np.nan
        return np.sign(x) * np.log1p(np.abs(x))


def fit_scaler(smiles: Sequence[str]) -> dict[str, Any]:
    """Mean and standard deviation per descriptor over ``smiles`` (the training split)."""
    x = np.stack([raw_descriptors(s) for s in smiles])
    mean = np.nan_to_num(np.nanmean(x, axis=0))
    std = np.nan_to_num(np.nanstd(x, axis=0))
    std[std < 1e-8] = 1.0
    from rdkit import __version__ as rdkit_version

    return {"descriptors": "rdkit2d", "descriptor_dim": int(x.shape[1]),
            "descriptor_mean": [round(float(v), 6) for v in mean],
            "descriptor_std": [round(float(v), 6) for v in std],
            "descriptor_rdkit": rdkit_version}


def normalised(smiles: str, input_spec: dict[str, Any]) -> np.ndarray:
    """Standardised, clipped descriptors (float32) as the model was trained on them.

    Raises:
        InputMismatchError: this RDKit computes a different descriptor set than training did.
    """
    x = raw_descriptors(smiles)
    want = int(input_spec["descriptor_dim"])
    if x.shape[0] != want:
        raise InputMismatchError(
            f"this RDKit computes {x.shape[0]} descriptors; the model was trained on {want} "
            f"(RDKit {input_spec.get('descriptor_rdkit')})",
            hint="install the RDKit version named in the model card")
    z = (x - np.asarray(input_spec["descriptor_mean"])) / np.asarray(input_spec["descriptor_std"])
    return np.clip(np.nan_to_num(z, nan=0.0), -6, 6).astype(np.float32)
