"""SMILES → RDKit molecule (sanitised) → Chemprop graph or Morgan/ECFP fingerprint.

Parsing is RDKit's ``MolFromSmiles`` split in two steps (parse, then ``SanitizeMol``) so the
reason a SMILES is rejected (valence, kekulisation, syntax) can be reported with the row or
input it came from. Empty SMILES and SMILES made only of wildcard atoms (``*``) are rejected
too: RDKit accepts them, but there is no molecule to predict for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
from chemprop.data import MolGraph

from meddx.modalities.molecule.smiles import MolParse, parse_smiles, require_mol

__all__ = [
    "MolParse",
    "parse_smiles",
    "require_mol",
    "graph_featurizer",
    "mol_graph",
    "fingerprint",
    "featurize",
    "SmilesMolGraph",
    "MolInput",
    "MolBatch",
    "collate_inputs",
]

logger = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def graph_featurizer() -> Any:
    """Chemprop's default molecule featurizer (v2 multi-hot atoms, multi-hot bonds)."""
    from chemprop.featurizers import SimpleMoleculeMolGraphFeaturizer

    return SimpleMoleculeMolGraphFeaturizer()


def mol_graph(mol: Any) -> Any:
    """Chemprop ``MolGraph`` of a molecule (bond features as float32)."""
    g = graph_featurizer()(mol)
    return g._replace(E=g.E.astype(np.float32, copy=False))


def fingerprint(mol: Any, radius: int = 2, bits: int = 2048) -> np.ndarray:
    """Morgan (ECFP-``2·radius``) bit vector as float32 (bits,)."""
    return _morgan(radius, bits).GetFingerprintAsNumPy(mol).astype(np.float32)


@lru_cache(maxsize=8)
def _morgan(radius: int, bits: int) -> Any:
    from rdkit.Chem import rdFingerprintGenerator

    return rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=bits)


class SmilesMolGraph(MolGraph):
    """A Chemprop ``MolGraph`` that remembers its SMILES (``.smiles``), so an explainer handed
    only the model input can still draw the molecule. Defined at module level: picklable for
    DataLoader workers."""


@lru_cache(maxsize=20000)
def _cached(smiles: str, featurizer: str, radius: int, bits: int) -> Any:
    mol = require_mol(smiles)
    if featurizer != "graph":
        return fingerprint(mol, radius, bits)
    graph = SmilesMolGraph(*mol_graph(mol))
    graph.smiles = smiles
    return graph


class MolInput(NamedTuple):
    """A molecular graph plus molecule-level descriptors (normalised, float32)."""

    graph: Any
    x_d: np.ndarray


@dataclass(eq=False)
class MolBatch:
    """A ``BatchMolGraph`` with its molecules' descriptors ``X_d`` (N, D)."""

    bmg: Any
    X_d: Any

    def __len__(self) -> int:
        return len(self.bmg)

    def to(self, device: Any) -> MolBatch:
        self.bmg.to(device)
        self.X_d = self.X_d.to(device)
        return self


def collate_inputs(xs: list[Any]) -> Any:
    """Model inputs of several molecules → one batch (``BatchMolGraph``, ``MolBatch`` or a
    stacked fingerprint tensor)."""
    import torch
    from chemprop.data import BatchMolGraph

    if isinstance(xs[0], MolInput):
        return MolBatch(BatchMolGraph([x.graph for x in xs]),
                        torch.from_numpy(np.stack([x.x_d for x in xs])))
    if isinstance(xs[0], MolGraph):
        return BatchMolGraph(list(xs))
    return torch.stack([torch.as_tensor(x) for x in xs])


def featurize(smiles: str, input_spec: dict[str, Any]) -> Any:
    """The model input for one (valid) SMILES: a ``MolGraph`` (with descriptors: a
    :class:`MolInput`) or a fingerprint tensor.

    Results are cached per SMILES (bounded), since training reads each molecule every epoch.
    """
    import torch

    kind = input_spec.get("featurizer", "graph")
    out = _cached(smiles, kind, int(input_spec.get("fp_radius", 2)),
                  int(input_spec.get("fp_bits", 2048)))
    if kind == "ecfp":
        return torch.from_numpy(out)
    if input_spec.get("descriptors", "none") != "none":
        from meddx.modalities.molecule.descriptors import normalised

        return MolInput(out, normalised(smiles, input_spec))
    return out
