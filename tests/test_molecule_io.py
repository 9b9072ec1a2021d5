"""SMILES reading: sanitisation, every bad input the issue lists, featurizers, collation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meddx.errors import ConfigError, DataError
from meddx.modalities import get_modality
from meddx.modalities.molecule.io import fingerprint, graph_featurizer, parse_smiles, require_mol
from meddx.modalities.molecule.networks import GRAPH_SPEC
from meddx.models import build_network

GRAPH = {"format": "smiles", "featurizer": "graph", "atom_fdim": 72, "bond_fdim": 14,
         "task_kind": "multilabel", "positive_index": None}
ECFP = {"format": "smiles", "featurizer": "ecfp", "fp_radius": 2, "fp_bits": 2048,
        "task_kind": "binary", "positive_index": 1}


@pytest.mark.parametrize("smiles,reason", [
    ("", "empty SMILES"),
    ("   ", "empty SMILES"),
    ("*", "only wildcard atoms"),
    ("[*]**", "only wildcard atoms"),
    ("C1CC", "syntax error"),
    ("c1cccc1", "Can't kekulize"),
    ("CC(C)(C)(C)(C)C", "valence"),
    ("not a smiles", "syntax error"),
])
def test_bad_smiles_at_prediction_is_an_error_naming_the_input(smiles: str, reason: str) -> None:
    with pytest.raises(DataError, match=reason) as e:
        get_modality("molecule").read(smiles, GRAPH)
    shown = repr(smiles.strip()) if smiles.strip() else "(empty)"
    assert shown in e.value.message
    with pytest.raises(DataError, match="mol-7"):
        get_modality("molecule").read({"smiles": smiles, "id": "mol-7"}, GRAPH)


def test_partial_wildcards_are_kept_and_a_salt_is_one_molecule() -> None:
    assert parse_smiles("*C(=O)O").mol is not None  # ClinTox has such entries
    assert require_mol("[Na+].[Cl-]").GetNumAtoms() == 2
    with pytest.raises(DataError, match="cannot read a molecule from int"):
        get_modality("molecule").read(42, GRAPH)


def test_graph_featurizer_matches_the_models_example_spec() -> None:
    d_v, d_e = graph_featurizer().shape
    assert (GRAPH_SPEC["in_channels"], GRAPH_SPEC["bond_fdim"]) == (d_v, d_e)


def test_read_and_collate_graphs_into_a_chemprop_batch() -> None:
    from chemprop.data import BatchMolGraph

    mod = get_modality("molecule")
    samples = [mod.read(s, GRAPH) for s in ["CCO", "c1ccccc1O", "C"]]
    assert samples[0].id == "CCO" and samples[1].meta["n_atoms"] == 7
    x, y = mod.collate([(s.tensor, torch.zeros(12)) for s in samples])
    assert isinstance(x, BatchMolGraph) and len(x) == 3 and y.shape == (3, 12)
    net = build_network("dmpnn", num_outputs=12, spec=mod.network_spec(GRAPH))
    assert net(x).shape == (3, 12)
    with pytest.raises(DataError, match="takes molecular graphs"):
        net(torch.zeros(3, 2048))


def test_ecfp_features_and_model_agree_with_rdkit() -> None:
    from rdkit.Chem.Draw import SimilarityMaps

    mod = get_modality("molecule")
    s = mod.read("CCOc1ccc2nc(S(N)(=O)=O)sc2c1", ECFP)
    assert s.tensor.shape == (2048,) and set(np.unique(s.tensor.numpy())) <= {0.0, 1.0}
    # the explainer's fingerprint (RDKit SimilarityMaps) must be the one the model saw
    mol = require_mol(s.meta["smiles"])
    ref = SimilarityMaps.GetMorganFingerprint(mol, radius=2, fpType="bv", nBits=2048)
    assert sorted(np.flatnonzero(fingerprint(mol))) == list(ref.GetOnBits())
    x, _ = mod.collate([(s.tensor, torch.tensor(1)), (s.tensor, torch.tensor(0))])
    net = build_network("ecfp_mlp", num_outputs=1, spec=mod.network_spec(ECFP))
    assert net(x).shape == (2, 1)
    assert mod.default_network(None, ECFP)[0] == "ecfp_mlp"
    assert mod.default_network(None, GRAPH)[0] == "dmpnn"


def test_model_and_featurizer_mismatch_is_a_config_error() -> None:
    mod = get_modality("molecule")
    with pytest.raises(ConfigError, match="featurizer: ecfp"):
        build_network("ecfp_mlp", num_outputs=1, spec=mod.network_spec(GRAPH))
    with pytest.raises(ConfigError, match="featurizer: graph"):
        build_network("dmpnn", num_outputs=1, spec=mod.network_spec(ECFP))


def test_no_fhir_mapping_for_molecules() -> None:
    with pytest.raises(ConfigError, match="no FHIR mapping"):
        get_modality("molecule").to_fhir(None, None)
