"""Shared fixtures: bundled data through the same resolver users have, tiny trained packages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meddx.catalog import data_roots

IN_CI = os.environ.get("CI", "").lower() == "true"


def require_data(relpath: str) -> Path:
    """Path of a bundled data file or folder; skip if absent (fail under CI=true)."""
    for root in data_roots():
        p = root / relpath
        if p.exists():
            return p
    msg = f"bundled data {relpath} not found under {[str(r) for r in data_roots()]}"
    if IN_CI:
        pytest.fail(msg + " (CI=true: missing data is a failure)")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def breast_npz() -> Path:
    return require_data("medmnist/breastmnist.npz")


@pytest.fixture(scope="session")
def tiny_breast_package(tmp_path_factory: pytest.TempPathFactory, breast_npz: Path):
    """A BreastMNIST package trained for 2 epochs on a slice (shared by tests that need one)."""
    from meddx.training import train

    out = tmp_path_factory.mktemp("breast_run")
    return train(
        {"name": "breast-tiny", "seed": 0,
         "data": {"dataset": "breastmnist", "limit": 160},
         "train": {"epochs": 2, "batch_size": 32, "early_stopping_patience": None}},
        out=out, progress=False,
    )


def _untrained_package(out: Path, name: str, modality: str, task: dict, network: str,
                       options: dict, spec: dict):
    """A package of an untrained (seeded) network: enough for serving and CLI paths, where
    what matters is that an answer and its explanation come back, not that they are right."""
    import torch

    from meddx.modalities import get_modality
    from meddx.models import build_network
    from meddx.package import ModelCard, save_package
    from meddx.tasks import TaskSpec

    task_spec = TaskSpec(**task)
    torch.manual_seed(0)
    net = build_network(network, num_outputs=task_spec.num_outputs,
                        spec=get_modality(modality).network_spec(spec), options=options)
    card = ModelCard(name=name, modality=modality, task=task_spec,
                     network={"name": network, "options": options}, preprocessing=spec)
    return save_package(out / "model", net.eval(), card)


BINARY_SPEC = {"task_kind": "binary", "positive_index": 1}


@pytest.fixture(scope="session")
def tiny_sequence_package(tmp_path_factory: pytest.TempPathFactory):
    """An untrained seq_cnn on 24-base DNA (binary: absent / present)."""
    spec = {"format": "dna-onehot", "alphabet": "ACGT", "iupac": "fractional", "channels": 4,
            "length": 24, "spatial_dims": 1, "size": 24, "reverse_complement": False,
            **BINARY_SPEC}
    return _untrained_package(
        tmp_path_factory.mktemp("seq_pkg"), "splice-tiny", "sequence",
        {"kind": "binary", "class_names": ["absent", "present"], "positive_class": "present"},
        "seq_cnn", {"filters": [8], "kernels": [5], "pools": [2], "hidden": 8, "dropout": 0.0},
        spec)


@pytest.fixture(scope="session")
def tiny_molecule_package(tmp_path_factory: pytest.TempPathFactory):
    """An untrained small D-MPNN (binary: inactive / active)."""
    spec = {"format": "smiles", "sanitize": True, "featurizer": "graph",
            "atom_features": "chemprop-v2", "atom_fdim": 72, "bond_fdim": 14, **BINARY_SPEC}
    return _untrained_package(
        tmp_path_factory.mktemp("mol_pkg"), "tox-tiny", "molecule",
        {"kind": "binary", "class_names": ["inactive", "active"], "label_values": [0, 1],
         "positive_class": "active"},
        "dmpnn", {"hidden": 16, "ffn_hidden": 8}, spec)


@pytest.fixture(scope="session")
def tiny_ecg_package(tmp_path_factory: pytest.TempPathFactory):
    """An untrained small 1D ResNet on one lead at 100 Hz, 5 s windows (binary: normal / af)."""
    spec = {"modality": "ecg", "leads": ["I"], "fs": 100.0, "length": 500, "stride": 250,
            "min_seconds": 2.0, "channels": 1, "spatial_dims": 1, "normalize": "zscore",
            "aggregate": "mean", **BINARY_SPEC}
    return _untrained_package(
        tmp_path_factory.mktemp("ecg_pkg"), "af-untrained", "ecg",
        {"kind": "binary", "class_names": ["normal", "af"], "positive_class": "af"},
        "resnet1d", {"layers": [1, 1, 1, 1], "widths": [8, 8, 16, 16], "stem_stride": 4}, spec)


def synthetic_ecg_observation(seconds: float = 12.0, fs: float = 250.0,
                              subject: str | None = None) -> dict:
    """A FHIR Observation (``valueSampledData``) of a made-up one-lead trace: spikes at
    72 beats per minute over a slow baseline (no bundled data needed)."""
    import numpy as np

    from meddx.modalities.ecg.fhir import record_to_observation
    from meddx.modalities.ecg.io import from_array

    t = np.arange(int(seconds * fs)) / fs
    beats = np.exp(-(((t % (60 / 72)) - 0.3) ** 2) / 2e-4)
    signal = beats + 0.1 * np.sin(2 * np.pi * 0.3 * t)
    return record_to_observation(from_array(signal[None], fs, ["I"], "synthetic"),
                                 subject=subject)


# the real PACS for the DICOM tests (tests/orthanc_support.py)
from orthanc_support import orthanc_fixture  # noqa: E402,F401
