"""End to end on a tiny trained BreastMNIST package: post-hoc fits on calib, evaluate, the
files it writes, the errors a user gets, and the paired comparison."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from evaluation_support import evaluated
from meddx.errors import EvaluationError
from meddx.evaluation import evaluate
from meddx.package import load_package


def _strict(text: str) -> dict:
    def bad(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=bad)


def test_trainer_fits_post_hoc_on_calib(tiny_breast_package):
    card = tiny_breast_package.card
    assert card.calibration is not None and card.calibration.fitted_on == "calib"
    assert set(card.operating_points) == {"sensitivity@0.95", "specificity@0.9", "youden",
                                          "balanced"}
    bal = card.operating_points["balanced"]
    assert bal.method == "balanced" and bal.target is None and bal.calib_ppv is not None
    assert card.default_operating_point == "sensitivity@0.95"
    op = card.operating_point
    assert op.positive_class == "malignant" and op.calib_sensitivity >= 0.95
    assert card.conformal is not None and card.conformal.method == "lac"
    assert card.conformal.alpha == 0.1 and card.conformal.n_calib > 0


@pytest.mark.slow
def test_evaluate_reports_metrics_with_intervals_and_writes_files(tiny_breast_package):
    r = evaluated(str(tiny_breast_package.path))
    auroc = r.metrics["auroc"]
    assert auroc["low"] <= auroc["value"] <= auroc["high"]
    assert r.threshold == r.card.operating_point.threshold
    sens = r.operating_points["sensitivity@0.95"]
    c = sens["confusion"]
    assert c["tp"] + c["fn"] == int((r.targets == 1).sum()) and sum(c.values()) == r.n
    assert sens["metrics"]["sensitivity"]["value"] == pytest.approx(c["tp"] / (c["tp"] + c["fn"]))
    assert r.calibration["temperature"] == r.card.calibration.temperature
    assert 0 <= r.conformal["coverage"] <= 1 and r.conformal["mean_set_size"] >= 1
    kinds = [e["kind"] for e in r.errors]
    assert kinds == sorted(kinds, key=lambda k: k != "false negative")  # misses first
    assert all("image" in e for e in r.errors)
    metrics = _strict((r.out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n"] == r.n
    card = _strict((r.out / "card.json").read_text())
    assert card["metrics"]["breastmnist/test"]["auroc"]["value"] == pytest.approx(auroc["value"])
    assert load_package(r.out.parent / "model").card.metrics  # package still verifies
    assert r.report.is_file() and r.report.stat().st_size > 10_000


def test_model_for_another_dataset_is_a_clear_error(tiny_breast_package):
    with pytest.raises(EvaluationError, match="breastmnist.*pneumoniamnist"):
        evaluate(tiny_breast_package.path, dataset="pneumoniamnist")


def test_missing_split_is_a_clear_error(tiny_breast_package, tmp_path):
    with pytest.raises(EvaluationError, match="no split 'holdout'") as info:
        evaluate(tiny_breast_package.path, split="holdout", update_card=False)
    assert "test" in str(info.value.hint)


@pytest.mark.slow
def test_cli_error_has_no_stack_trace(tiny_breast_package):
    out = subprocess.run([sys.executable, "-m", "meddx.cli", "evaluate",
                          str(tiny_breast_package.path), "--dataset", "pneumoniamnist"],
                         capture_output=True, text=True, timeout=120)
    if "No module named meddx.cli.__main__" in out.stderr or out.returncode == 0:
        out = subprocess.run([sys.executable, "-c", "from meddx.cli import main; main()",
                              "evaluate", str(tiny_breast_package.path), "--dataset",
                              "pneumoniamnist"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "pneumoniamnist" in out.stderr


@pytest.mark.slow
def test_compare_a_model_with_itself(tiny_breast_package, tmp_path):
    from meddx.evaluation import compare_models

    twin = tmp_path / "twin"
    shutil.copytree(tiny_breast_package.path, twin)
    res = compare_models(tiny_breast_package.path, twin)
    d = res["delong"]["malignant"]
    assert d["p_value"] == 1.0 and d["difference"] == 0.0
    assert res["mcnemar"]["a_only"] == res["mcnemar"]["b_only"] == 0
    assert res["n"] == 156 and np.isfinite(d["auroc_a"])
