"""`meddx predict` names its answers by what they are, the recommendation first, and shows the
OOD flag in the table and the CSV (issue 23, point 22)."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from typer.testing import CliRunner

from icu_support import clean_body, icu_package, write_stay
from meddx.cli import app

runner = CliRunner()
# everyone is an alert at this point: the decision differs from the most likely class
POINTS = {"sensitivity@0.8": {"method": "sensitivity", "target": 0.8, "threshold": 0.0,
                              "calib_sensitivity": 1.0, "calib_specificity": 0.0}}
HEAD = ["id", "decision", "operating_point", "threshold", "most_likely_class"]


@pytest.fixture(scope="module")
def icu(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("icu_cols")
    write_stay(tmp / "stays", 400001, clean_body(90))
    return icu_package(tmp, POINTS, default="sensitivity@0.8"), tmp / "stays"


def _predict(*args: str):
    r = runner.invoke(app, ["predict", *map(str, args)])
    assert r.exit_code == 0, r.output
    return r.stdout


def test_csv_columns_say_what_they_are_recommendation_first(icu):
    package, stays = icu
    text = _predict(package.path, stays, "--format", "csv")
    header = text.splitlines()[0].split(",")
    assert header[: len(HEAD)] == HEAD
    assert {"conformal_set", "refer", "review", "ood"} <= set(header)
    assert not {"label", "set"} & set(header)  # the ambiguous old names
    [row] = csv.DictReader(io.StringIO(text))
    # the decision follows the operating point, not the most likely class
    assert (row["decision"], row["operating_point"], float(row["threshold"])) == (
        "died", "sensitivity@0.8", 0.0)
    assert row["most_likely_class"] in ("survived", "died")
    assert row["ood"] == ""  # this package has no detector: not "False"


def test_table_has_the_same_columns_and_says_what_each_means(icu):
    package, stays = icu
    out = " ".join(_predict(package.path, stays).split())
    first = out.index("decision")
    assert first < out.index("operating point") < out.index("most likely class")
    assert "conformal set" in out and "ood" in out
    assert "decision: the recommendation" in out
    assert "most likely class: the class with the highest probability" in out


@pytest.mark.slow
def test_ood_flag_in_table_and_csv(tiny_breast_package, breast_npz, tmp_path):
    noise = np.random.default_rng(7).integers(0, 256, (28, 28)).astype(np.uint8)
    np.save(tmp_path / "noise.npy", noise)
    np.save(tmp_path / "breast.npy", np.load(breast_npz)["test_images"][0])
    model = tiny_breast_package.path
    rows = {r["id"]: r for r in csv.DictReader(io.StringIO(
        _predict(model, tmp_path / "noise.npy", tmp_path / "breast.npy", "--format", "csv")))}
    assert rows["noise.npy"]["ood"] == "True" and rows["noise.npy"]["decision"] == ""
    assert rows["breast.npy"]["ood"] in ("True", "False") and rows["noise.npy"]["ood_score"]
    table = _predict(model, tmp_path / "noise.npy")
    assert "ood" in table and "True" in table
