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
