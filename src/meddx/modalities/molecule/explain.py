"""Per-atom contributions for molecule models, drawn on the molecule with RDKit.

* Graph models (``dmpnn``): atom masking — for each atom, its feature row and the features of
  its bonds are zeroed (all masked copies scored in one batched pass); the contribution is
  p(original) − p(masked): positive where the atom supports the class.
* Fingerprint models (``ecfp_mlp``): RDKit's own scheme (``SimilarityMaps.
  GetAtomicWeightsForModel``): each atom's Morgan bits are removed and the change in the
  predicted probability is its weight.

:func:`draw_atom_contributions` renders the weights with ``SimilarityMaps.
GetSimilarityMapFromWeights`` on a ``MolDraw2DCairo`` canvas and writes a PNG.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddx.errors import ConfigError, DataError
from meddx.modalities.scoring import class_score, top_class

__all__ = ["AtomExplainer", "atom_masking", "fingerprint_atom_weights", "draw_atom_contributions"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def atom_masking(model: torch.nn.Module, graph: Any, class_index: int,
                 input_spec: dict[str, Any], task: Any | None = None) -> tuple[float, np.ndarray]:
    """Contribution of each atom of a Chemprop ``MolGraph`` (or a ``MolInput`` with
    descriptors, which stay unchanged) by masking the atom's and its bonds' features.

    Returns:
        (score of the unmasked molecule, contributions (n_atoms,))
    """
    from meddx.modalities.molecule.io import MolInput, collate_inputs

    model.eval()
    x_d = graph.x_d if isinstance(graph, MolInput) else None
    graph = graph.graph if isinstance(graph, MolInput) else graph
    n = graph.V.shape[0]
    copies = [graph]
    src, dst = graph.edge_index
    for i in range(n):
        v = graph.V.copy()
        v[i] = 0.0
        e = graph.E.copy()
        e[(src == i) | (dst == i)] = 0.0
        copies.append(graph._replace(V=v, E=e))
    items = copies if x_d is None else [MolInput(g, x_d) for g in copies]
    scores = class_score(model(collate_inputs(items)), class_index, input_spec, task).numpy()
    return float(scores[0]), scores[0] - scores[1:]


def fingerprint_atom_weights(model: torch.nn.Module, mol: Any, class_index: int,
                             input_spec: dict[str, Any], task: Any | None = None
                             ) -> tuple[float, np.ndarray]:
    """RDKit's per-atom weights for a fingerprint model (bits of each atom removed in turn)."""
    from rdkit import DataStructs
    from rdkit.Chem.Draw import SimilarityMaps

    radius, bits = int(input_spec.get("fp_radius", 2)), int(input_spec.get("fp_bits", 2048))
    model.eval()

    def fp_fn(m: Any, atom: int = -1) -> Any:
        return SimilarityMaps.GetMorganFingerprint(m, atomId=atom, radius=radius, fpType="bv",
                                                   nBits=bits)

    def predict(fp: Any) -> float:
        arr = np.zeros((bits,), dtype=np.float32)
        DataStructs.ConvertToNumpyArray(fp, arr)
        with torch.no_grad():
            z = model(torch.from_numpy(arr).unsqueeze(0))
        return float(class_score(z, class_index, input_spec, task)[0])

    weights = SimilarityMaps.GetAtomicWeightsForModel(mol, fp_fn, predict)
    return predict(fp_fn(mol)), np.asarray(weights, dtype=float)


class AtomExplainer:
    """``explain(sample, class_index) -> contributions (n_atoms,)``; ``plot`` draws them.

    Args:
        model: the fp32 network.
        input_spec: the package's preprocessing (featurizer, task kind, positive class).
        task: optional :class:`~meddx.tasks.TaskSpec` (wins over the spec's task fields).
    """

    def __init__(self, model: torch.nn.Module, input_spec: dict[str, Any] | None = None, *,
                 task: Any = None, **_: Any) -> None:
        self.model = model
        self.input_spec = dict(input_spec or {})
        self.task = task
        self.score_: float | None = None

    def explain(self, sample: Any, class_index: int | None = None) -> np.ndarray:
        """Per-atom contributions (atom order of the input SMILES) for ``class_index``
        (None: the predicted class) of a Sample from ``modality.read`` or a SMILES string."""
        from chemprop.data import MolGraph

        from meddx.modalities.molecule.io import MolInput, featurize

        if class_index is None:
            class_index = self.top_class(sample)
        if self.input_spec.get("featurizer", "graph") == "ecfp":
            mol = _mol_of(sample)
            self.score_, w = fingerprint_atom_weights(self.model, mol, class_index,
                                                      self.input_spec, self.task)
            return w
        graph = getattr(sample, "tensor", sample)
        if not isinstance(graph, MolGraph | MolInput):
            graph = featurize(_mol_smiles(sample), self.input_spec)
        self.score_, w = atom_masking(self.model, graph, class_index, self.input_spec, self.task)
        return w

    def top_class(self, sample: Any) -> int:
        """The network's predicted class for a Sample or a SMILES string."""
        from meddx.modalities.molecule.io import collate_inputs, featurize

        batch = collate_inputs([featurize(_mol_smiles(sample), self.input_spec)])
        self.model.eval()
        with torch.no_grad():
            return top_class(self.model(batch), self.input_spec, self.task)

    def plot(self, sample: Any, attribution: np.ndarray, path: str | Path,
             class_name: str | None = None) -> Path:
        """Draw ``attribution`` on the molecule of ``sample`` (PNG)."""
        legend = f"{class_name}: p = {self.score_:.3f}" if class_name and self.score_ is not None \
            else (class_name or "")
        return draw_atom_contributions(_mol_of(sample), attribution, path, legend=legend)

    def summary(self, sample: Any, attribution: np.ndarray, k: int = 5) -> dict[str, Any]:
        """The ``k`` atoms with the largest |contribution|, largest first: 0-based index in
        the input SMILES's atom order, element symbol and contribution (positive: supports
        the class)."""
        mol = _mol_of(sample)
        w = np.asarray(attribution, dtype=float).reshape(-1)
        if len(w) != mol.GetNumAtoms():
            raise DataError(f"{len(w)} weights for a molecule with {mol.GetNumAtoms()} atoms")
        method = "fingerprint_atom_weights" if self.input_spec.get("featurizer") == "ecfp" \
            else "atom_masking"
        top = np.argsort(-np.abs(w), kind="stable")[:k]
        return {"method": method, "top_atoms": [
            {"index": int(i), "symbol": mol.GetAtomWithIdx(int(i)).GetSymbol(),
             "contribution": round(float(w[i]), 6)} for i in top]}


def _mol_of(sample: Any) -> Any:
    from meddx.modalities.molecule.io import require_mol

    if isinstance(sample, str):
        return require_mol(sample)
    x = getattr(sample, "tensor", sample)
    smiles = getattr(sample, "meta", {}).get("smiles") or getattr(
        getattr(x, "graph", x), "smiles", None)
    if smiles is None:
        raise ConfigError("this explanation needs the molecule's SMILES",
                          hint="pass the Sample from modality.read(), not a bare tensor")
    return require_mol(smiles)


def _mol_smiles(sample: Any) -> str:
    from rdkit import Chem

    return sample if isinstance(sample, str) else Chem.MolToSmiles(_mol_of(sample))


def draw_atom_contributions(mol: Any, weights: np.ndarray, path: str | Path,
                            size: tuple[int, int] = (520, 420), legend: str = "") -> Path:
    """Draw per-atom weights on the molecule (RDKit similarity map, red ↔ green) as a PNG.

    ``legend`` is drawn under single-atom molecules only (RDKit's similarity map has none).

    Raises:
        DataError: weights that do not match the atoms.
    """
    from rdkit.Chem.Draw import SimilarityMaps, rdMolDraw2D

    w = [float(x) for x in np.asarray(weights).reshape(-1)]
    if len(w) != mol.GetNumAtoms():
        raise DataError(f"{len(w)} weights for a molecule with {mol.GetNumAtoms()} atoms")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    d2d = rdMolDraw2D.MolDraw2DCairo(*size)
    if legend:
        d2d.drawOptions().legendFontSize = 18
    if mol.GetNumAtoms() < 2:  # a similarity map needs two atoms; draw the atom plainly
        d2d.DrawMolecule(mol, legend=legend)
    else:
        scale = max(abs(x) for x in w) or 1.0
        SimilarityMaps.GetSimilarityMapFromWeights(mol, [x / scale for x in w], draw2d=d2d)
    d2d.FinishDrawing()
    out.write_bytes(d2d.GetDrawingText())
    return out
