"""External validation: calibration-in-the-large and slope (known answers), the ICU path with
messy PhysioNet files (dropped lines counted, never a crash), broken promises flagged, the
image path from a labels CSV, and `meddx validate` as users run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from icu_support import clean_body, icu_package, write_stay
from meddx.errors import DataError
from meddx.evaluation.external import validate
from meddx.statistics.calibration import calibration_intercept_slope, calibration_transport


# ---------------------------------------------------------------------- known answers
def _synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.0, 1.5, n)
    p = 1 / (1 + np.exp(-z))
    return (rng.random(n) < p).astype(int), z


def test_perfect_calibration_has_intercept_0_and_slope_1():
    y, z = _synthetic(20_000)
    got = calibration_intercept_slope(y, 1 / (1 + np.exp(-z)))
    assert got["intercept"] == pytest.approx(0, abs=0.05)
    assert got["slope"] == pytest.approx(1, abs=0.05)
    assert got["observed_minus_expected"] == pytest.approx(0, abs=0.01)


def test_over_confident_and_shifted_predictions():
    y, z = _synthetic(5000, 1)
    over = calibration_transport(y, 1 / (1 + np.exp(-2 * z)), n_resamples=200)
    assert over["slope"]["value"] == pytest.approx(0.5, abs=0.05)
    assert over["slope"]["high"] < 1  # the interval excludes 1
    low = calibration_transport(y, 1 / (1 + np.exp(-(z - 1))), n_resamples=200)
    assert low["intercept"]["value"] == pytest.approx(1, abs=0.1)  # risk under-predicted by 1
    assert low["intercept"]["low"] > 0 and low["observed_minus_expected"]["value"] > 0
    assert low["slope"]["value"] == pytest.approx(1, abs=0.1)


# ------------------------------------------------------------------------ ICU path
@pytest.fixture(scope="module")
def icu_external(tmp_path_factory) -> tuple[Path, Path]:
    """An ICU package promising sensitivity 0.95 at a threshold nothing reaches, and a
    PhysioNet-layout folder: 30 stays (one with an empty parameter name, one with nothing
    usable) and an Outcomes file."""
    tmp = tmp_path_factory.mktemp("icu_ext")
    pkg = icu_package(tmp, {"sensitivity@0.95": {"method": "sensitivity", "target": 0.95,
                                                 "threshold": 0.999999}}, "sensitivity@0.95")
    folder = tmp / "other_centre"
    rows = ["RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death"]
    for i in range(30):
        rid = 400000 + i
        body = clean_body(60 + 3 * i)
        if i == 0:
            body += "10:45,,1.9\n"  # an empty parameter name, as found in real files
        if i == 1:
            body = "01:00,HR,-1\n"
        write_stay(folder / "set-x", rid, body, weight=-1 if i == 1 else 80)
        rows.append(f"{rid},10,2,5,-1,{int(i % 3 == 0)}")
    (folder / "Outcomes-x.txt").write_text("\n".join(rows) + "\n")
    return pkg.path, folder


def test_icu_external_counts_dropped_lines_and_flags_a_broken_promise(icu_external, tmp_path):
    model, folder = icu_external
    result = validate(model, folder, out=tmp_path / "ext", bootstrap=200)
    assert result.split == "external" and result.n == 29  # one stay refused
    dropped = result.data["dropped_lines"]
    assert dropped["by_split"]["external"]["by_reason"]["empty_parameter"] == 1
    assert dropped["refused_stays"]["stays"] == 1
    assert dropped["refused_stays"]["by_reason"]["missing_value"] == 1
    promise = result.external["promises"][0]
    assert promise["operating_point"] == "sensitivity@0.95" and promise["status"] == "broken"
    assert any("no longer holds its promise" in w for w in result.external["warnings"])
    cal = result.external["calibration"]
    assert set(cal) == {"intercept", "slope", "observed_minus_expected"}
    html = (tmp_path / "ext" / "report.html").read_text()
    assert 'id="external-mark"' in html and 'id="external"' in html
    assert "empty parameter name" in html and "no longer holds" in html
    saved = json.loads((tmp_path / "ext" / "metrics.json").read_text())
    assert saved["split"] == "external" and saved["external"]["promises"][0]["status"] == "broken"


@pytest.mark.slow
def test_cli_validate_prints_counts_and_warning(icu_external, tmp_path):
    model, folder = icu_external
    proc = subprocess.run([sys.executable, "-m", "meddx.cli", "validate", str(model),
                           str(folder), "--out", str(tmp_path / "cli"), "--bootstrap", "100"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = " ".join(proc.stdout.split())
    assert "external validation" in out and "calibration slope" in out
    assert "empty parameter name: 1" in out
    assert "warning:" in out and "sensitivity@0.95 no longer holds its promise" in out
    assert (tmp_path / "cli" / "report.html").is_file()


def test_missing_outcomes_is_a_data_error(icu_external, tmp_path):
    model, folder = icu_external
    empty = tmp_path / "no_outcomes"
    write_stay(empty, 500000, clean_body())
    with pytest.raises(DataError, match="Outcomes"):
        validate(model, empty)


# ----------------------------------------------------------------------- image path
def test_image_external_from_labels_csv(tiny_breast_package, breast_npz, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    with np.load(breast_npz) as d:
        images, labels = d["test_images"][:60], d["test_labels"][:60].ravel()
    names = tiny_breast_package.card.task.class_names
    values = tiny_breast_package.card.task.label_values or list(range(len(names)))
    lines = ["path,label"]
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(img).save(folder / f"{i}.png")
        lines.append(f"{i}.png,{values[int(lab)]}")
    (folder / "broken.png").write_bytes(b"not a png")
    lines.append(f"broken.png,{values[0]}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    result = validate(tiny_breast_package.path, folder, out=tmp_path / "rep", bootstrap=100)
    assert result.n == 60 and result.data["info"]["left_out_cases"] == 1
    assert "auroc" in result.metrics and result.external["calibration"] is not None
    assert 'id="external-mark"' in (tmp_path / "rep" / "report.html").read_text()
