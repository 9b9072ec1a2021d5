"""Atom contributions: a network whose answer is known, and the package/predictor path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from meddx.errors import DataError
from meddx.inference import load_model
from meddx.modalities import get_modality
from meddx.modalities.molecule.io import mol_graph, require_mol
from meddx.models import build_network
from meddx.package import ModelCard, save_package
from meddx.tasks import TaskSpec

GRAPH = {"format": "smiles", "sanitize": True, "featurizer": "graph",
         "atom_features": "chemprop-v2", "atom_fdim": 72, "bond_fdim": 14,
         "task_kind": "binary", "positive_index": 1}
BINARY = TaskSpec(kind="binary", class_names=["inactive", "active"], label_values=[0, 1],
                  positive_class="active")
PNG = b"\x89PNG\r\n\x1a\n"


class NitrogenCounter(torch.nn.Module):
    """Logit = 3 × (number of nitrogen atoms) − 1: only nitrogens can matter."""

    def __init__(self) -> None:
        super().__init__()
        v_n = mol_graph(require_mol("N")).V[0]
        v_c = mol_graph(require_mol("C")).V[0]
        self.column = int(np.argmax(v_n - v_c))  # the atomic-number bit of N

    def forward(self, bmg) -> torch.Tensor:
        count = torch.zeros(len(bmg)).index_add_(0, bmg.batch, bmg.V[:, self.column])
        return (3 * count - 1).unsqueeze(1)


def test_atom_masking_credits_exactly_the_atoms_that_matter(tmp_path: Path) -> None:
    mod = get_modality("molecule")
    smiles = "CC(=O)Nc1ccc(O)cc1"  # paracetamol: one nitrogen, atom index 3
    sample = mod.read(smiles, GRAPH)
    explainer = mod.explainer(NitrogenCounter(), GRAPH)
    w = explainer.explain(sample, BINARY.positive_index)
    assert w.shape == (11,)
    assert int(np.argmax(w)) == 3 and w[3] > 0.5
    np.testing.assert_allclose(np.delete(w, 3), 0.0, atol=1e-6)
    # the other class's probability falls when the nitrogen is there: opposite sign
    assert explainer.explain(sample, 0)[3] < -0.5
    png = explainer.plot(sample, w, tmp_path / "atoms.png", class_name="active")
    assert png.read_bytes()[:8] == PNG


def test_ecfp_model_weights_per_atom_and_single_atom_drawing(tmp_path: Path) -> None:
    mod = get_modality("molecule")
    spec = {"format": "smiles", "featurizer": "ecfp", "fp_radius": 2, "fp_bits": 2048,
            "task_kind": "binary", "positive_index": 1}
    torch.manual_seed(0)
    net = build_network("ecfp_mlp", num_outputs=1, spec=mod.network_spec(spec)).eval()
    explainer = mod.explainer(net, spec)
    sample = mod.read("c1ccccc1O", spec)
    w = explainer.explain(sample)  # None: the predicted class
    assert w.shape == (7,) and np.isfinite(w).all() and np.abs(w).max() > 0
    methane = mod.read("C", spec)
    png = explainer.plot(methane, explainer.explain(methane, 1), tmp_path / "c.png", "active")
    assert png.read_bytes()[:8] == PNG


def test_dmpnn_package_predicts_and_explains_smiles(tmp_path: Path) -> None:
    task = TaskSpec(kind="multilabel", class_names=["NR-AR", "SR-p53"])
    spec = {**GRAPH, "task_kind": "multilabel", "positive_index": None}
    mod = get_modality("molecule")
    torch.manual_seed(0)
    net = build_network("dmpnn", num_outputs=2, spec=mod.network_spec(spec),
                        options={"hidden": 32, "ffn_hidden": 16})
    card = ModelCard(name="tox-mini", modality="molecule", task=task,
                     network={"name": "dmpnn", "options": {"hidden": 32, "ffn_hidden": 16}},
                     preprocessing=spec)
    save_package(tmp_path / "model", net, card)
    predictor = load_model(tmp_path / "model")
    preds = predictor.predict(["CCOc1ccc2nc(S(N)(=O)=O)sc2c1", {"smiles": "CCO", "id": "ethanol"}],
                              explain=True)
    assert [p.id for p in preds] == ["CCOc1ccc2nc(S(N)(=O)=O)sc2c1", "ethanol"]
    assert set(preds[0].probabilities) == {"NR-AR", "SR-p53"}
    assert preds[0].explanation.shape == (16,) and preds[1].explanation.shape == (3,)
    for bad in ["C1CC", "", "*"]:
        with pytest.raises(DataError, match="invalid SMILES"):
            predictor.predict([bad])


def test_explainer_draws_from_a_bare_model_input(tmp_path: Path) -> None:
    """The evaluation report's error gallery hands explainers ``item_tensor`` output only."""
    from meddx.modalities.base import Sample

    mod = get_modality("molecule")
    graph = mod.item_tensor("CC(=O)Nc1ccc(O)cc1", GRAPH)
    explainer = mod.explainer(NitrogenCounter(), GRAPH)
    sample = Sample(id="x", tensor=graph)
    w = explainer.explain(sample, None)
    assert w.shape == (11,)
    assert explainer.plot(sample, w, tmp_path / "g.png").read_bytes()[:8] == PNG
