"""`meddx validate` reads every dataset format `meddx evaluate` reads, through the same reader:
a MedMNIST .npz here (issue 23, point 21)."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from evaluation_support import untrained_package
from meddx.cli import app
from meddx.errors import DataError, EvaluationError
from meddx.evaluation.external import validate


@pytest.fixture(scope="module")
def package(tmp_path_factory, breast_npz):
    pkg, _ = untrained_package({"name": "breast-untrained", "seed": 0,
                                "data": {"dataset": "breastmnist", "limit": 40}},
                               tmp_path_factory.mktemp("ext_npz") / "model")
    return pkg


def _npz(path, source, n: int = {"train": 30, "val": 20, "test": 50}, size: int = 28):
    """A MedMNIST-layout file from another 'site': slices of the bundled one."""
    with np.load(source) as d:
        arrays = {}
        for split, k in n.items():
            x = d[f"{split}_images"][:k]
            if size != 28:
                x = np.repeat(np.repeat(x, size // 28, axis=1), size // 28, axis=2)
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, d[f"{split}_labels"][:k]
    np.savez(path, **arrays)
    return path


def test_validate_reads_a_medmnist_npz(package, breast_npz, tmp_path):
    data = _npz(tmp_path / "other_site.npz", breast_npz)
    result = validate(package.path, data, out=tmp_path / "rep", bootstrap=50)
    assert result.split == "external" and result.n == 50  # the test split
    assert result.data["info"]["format"] == "dataset file, split 'test'"
    assert "auroc" in result.metrics and result.external["calibration"] is not None
    assert 'id="external-mark"' in (tmp_path / "rep" / "report.html").read_text()
    assert validate(package.path, data, bootstrap=0, split="val", report=False).n == 20


def test_a_file_that_does_not_fit_the_model_is_refused(package, breast_npz, tmp_path):
    data = _npz(tmp_path / "big.npz", breast_npz, size=56)
    with pytest.raises(DataError, match="holds 56-px images, not the 28 px asked for"):
        validate(package.path, data, bootstrap=0)
    with pytest.raises(EvaluationError, match="no split 'nope'"):
        validate(package.path, _npz(tmp_path / "ok.npz", breast_npz), bootstrap=0, split="nope")


def test_cli_validate_takes_an_npz_and_a_split(package, breast_npz, tmp_path):
    data = _npz(tmp_path / "other_site.npz", breast_npz)
    r = CliRunner().invoke(app, ["validate", str(package.path), str(data), "--out",
                                 str(tmp_path / "cli"), "--bootstrap", "20", "--split", "val"])
    assert r.exit_code == 0, r.output
    assert "external validation on other_site.npz (n=20)" in " ".join(r.stdout.split())


def test_split_is_refused_for_data_read_case_by_case(package, tmp_path):
    from meddx.errors import ConfigError

    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n")
    with pytest.raises(ConfigError, match="read case by case"):
        validate(package.path, csv, bootstrap=0, split="val")
