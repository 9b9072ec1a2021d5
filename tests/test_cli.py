"""The `meddx` command line as users run it (a real subprocess)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

MEDDX = [str(Path(sys.executable).parent / "meddx")]


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*MEDDX, *args], capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_help_teaches() -> None:
    out = run("--help").stdout
    for cmd in ("datasets", "train", "predict"):
        assert cmd in out
    assert "breastmnist" in run("train", "--help").stdout


def test_datasets_lists_offline_availability() -> None:
    rows = json.loads(run("datasets", "--json").stdout)
    by_name = {r["name"]: r for r in rows}
    assert by_name["breastmnist"]["offline"] is True
    assert by_name["pathmnist"]["offline"] is False
    assert by_name["breastmnist"]["license"] == "CC BY 4.0"
    # which datasets `meddx train --dataset NAME` trains with a shipped recipe
    assert by_name["physionet2017"]["recipe"] is True and by_name["pathmnist"]["recipe"] is False


def test_unknown_dataset_is_a_clear_error_not_a_traceback() -> None:
    proc = run("train", "--dataset", "breastmnst", ok=False)
    assert proc.returncode == 2
    assert "did you mean 'breastmnist'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_predict_formats_and_worklist_sort(tiny_breast_package, breast_npz, tmp_path) -> None:
    images = np.load(breast_npz)["test_images"][:5]
    folder = tmp_path / "studies"
    folder.mkdir()
    for i, img in enumerate(images):
        np.save(folder / f"study{i}.npy", img)
    model = str(tiny_breast_package.path)
    data = json.loads(run("predict", model, str(folder), "--format", "json").stdout)
    preds = data["predictions"]
    assert len(preds) == 5 and data["errors"] == []
    assert {p["id"] for p in preds} == {f"study{i}.npy" for i in range(5)}
    table = run("predict", model, str(folder / "study0.npy")).stdout
    assert "study0.npy" in table
    # the class columns are named as in the CSV ("p[benign]", folded in a narrow table), not
    # cut to "p" by rich reading "[benign]" as markup
    assert table.count("p[") == 2
    rows = list(csv.DictReader(io.StringIO(
        run("predict", model, str(folder), "--format", "csv", "--sort", "risk").stdout)))
    risk = [float(r["p[malignant]"]) for r in rows]
    assert risk == sorted(risk, reverse=True)


@pytest.mark.slow
def test_predict_reports_bad_files_and_keeps_the_rest(tiny_breast_package, breast_npz,
                                                      tmp_path) -> None:
    good = tmp_path / "good.npy"
    np.save(good, np.load(breast_npz)["test_images"][0])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    proc = run("predict", str(tiny_breast_package.path), str(good), str(bad), "--format", "json",
               ok=False)
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert [p["id"] for p in data["predictions"]] == ["good.npy"]
    assert data["errors"][0]["id"] == "broken.png"
