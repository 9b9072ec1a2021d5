"""RDKit 2D descriptors appended to the D-MPNN embedding (Chemprop's rdkit_2d features)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from meddx.config import DataConfig
from meddx.errors import ConfigError, InputMismatchError
from meddx.inference import load_model
from meddx.modalities import get_modality
from meddx.modalities.molecule.descriptors import descriptor_count
from meddx.modalities.molecule.io import MolBatch, MolInput
from meddx.models import build_network
from meddx.package import ModelCard, save_package
from meddx.tasks import TaskSpec

TASK = TaskSpec(kind="binary", class_names=["inactive", "active"], label_values=[0, 1],
                positive_class="active")
SMILES = ["CCO", "CCN", "CCC", "c1ccccc1", "c1ccccc1O", "c1ccccc1N", "CC(=O)O", "CCOC",
          "C1CCCCC1", "C1CCNCC1", "OCCO", "CCCl", "CCBr", "c1ccncc1", "CC(C)O", "CCCC"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory):
    p = tmp_path_factory.mktemp("mols") / "m.csv"
    p.write_text("smiles,label\n" + "".join(f"{s},{i % 2}\n" for i, s in enumerate(SMILES * 2)))
    data = DataConfig(path=str(p), options={"descriptors": "rdkit2d"})
    return get_modality("molecule").load(data, None, TASK, 0)


def test_descriptors_are_standardised_on_train_and_batched(bundle) -> None:
    spec = bundle.input_spec
    d = descriptor_count()
    assert spec["descriptors"] == "rdkit2d" and spec["descriptor_dim"] == d
    assert len(spec["descriptor_mean"]) == d and min(spec["descriptor_std"]) > 0
    mod = get_modality("molecule")
    items = [mod.item_tensor(s, spec) for s in bundle.splits["train"].inputs[:4]]
    assert isinstance(items[0], MolInput) and items[0].x_d.dtype == np.float32
    assert np.abs(items[0].x_d).max() <= 6
    x, _ = mod.collate([(i, torch.tensor(0)) for i in items])
    assert isinstance(x, MolBatch) and x.X_d.shape == (4, d) and len(x) == 4
    net = build_network("dmpnn", num_outputs=1, spec=mod.network_spec(spec),
                        options={"hidden": 16, "ffn_hidden": 8})
    assert net(x).shape == (4, 1)
    with pytest.raises(InputMismatchError, match=f"expects {d} molecule descriptors"):
        net(x.bmg)


def test_package_with_descriptors_predicts_and_explains(bundle, tmp_path: Path) -> None:
    mod = get_modality("molecule")
    spec = bundle.input_spec
    options = {"hidden": 16, "ffn_hidden": 8}
    torch.manual_seed(0)
    net = build_network("dmpnn", num_outputs=1, spec=mod.network_spec(spec), options=options)
    card = ModelCard(name="desc", modality="molecule", task=TASK,
                     network={"name": "dmpnn", "options": options}, preprocessing=spec)
    predictor = load_model(save_package(tmp_path / "m", net, card).path)
    preds = predictor.predict(["CC(=O)Nc1ccc(O)cc1"], explain=True)
    assert 0 <= preds[0].probabilities["active"] <= 1
    assert preds[0].explanation.shape == (11,)
    wrong = {**spec, "descriptor_dim": spec["descriptor_dim"] + 1}
    with pytest.raises(InputMismatchError, match="descriptors"):
        mod.read("CCO", wrong)


def test_descriptors_need_the_graph_featurizer(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_text("smiles,label\n" + "".join(f"{s},{i % 2}\n" for i, s in enumerate(SMILES)))
    data = DataConfig(path=str(p), options={"descriptors": "rdkit2d", "featurizer": "ecfp"})
    with pytest.raises(ConfigError, match="graph featurizer"):
        get_modality("molecule").load(data, None, TASK, 0)
