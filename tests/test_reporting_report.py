"""The HTML report: self-contained, every figure renders in headless Chromium, and nothing in
it reads nan or None."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from evaluation_support import CHROMIUM, CHROMIUM_ARGS, evaluated
from meddx.evaluation.evaluator import EvaluationResult
from meddx.reporting.report import fmt, fmt_ci, render_report
from meddx.statistics.bootstrap import bootstrap_metrics
from meddx.tasks import TaskSpec

BAD_WORDS = re.compile(r"\b(nan|NaN|None|null|undefined|inf)\b")
MULTI = TaskSpec(kind="multiclass", class_names=["melanoma", "keratosis", "nevus"],
                 positive_class="melanoma")


def _degenerate_result() -> EvaluationResult:
    """A split in which one class never occurs and no card exists: many metrics undefined."""
    rng = np.random.default_rng(0)
    t = rng.integers(1, 3, 40)  # no melanoma at all
    p = rng.dirichlet(np.ones(3), 40)
    ci = bootstrap_metrics(MULTI, t, p, n_resamples=50)
    return EvaluationResult(
        model={"name": "m", "version": "1", "sha256": "0" * 64, "path": "/x", "trained_on": "d"},
        dataset="d", split="test", n=40, task=MULTI, metrics=dict(ci), threshold=None,
        notes=list(ci.notes), data={"dataset": "d", "modality": "image", "info": {},
                                    "splits": {"test": {"n": 40, "classes": {
                                        "melanoma": 0, "keratosis": 20, "nevus": 20}}},
                                    "patient_level_split": False},
        bootstrap={"resamples": 50, "seed": 0, "by_patient": False}, targets=t, probs=p,
        probs_raw=p)


def test_missing_values_read_na_with_a_reason():
    assert fmt(float("nan")) == "n/a" and fmt(None) == "n/a" and fmt(0.5, pct=True) == "50.0%"
    assert fmt_ci({"value": 0.8, "low": float("nan"), "high": 0.9}) == "0.800 (CI n/a)"
    html = render_report(_degenerate_result())
    text = re.sub(r"<[^>]+>", " ", re.sub(r"base64,[A-Za-z0-9+/=]+", "", html))
    assert not BAD_WORDS.search(text), BAD_WORDS.search(text)
    assert "n/a" in text and "only one class present" in text
    for heading in ("Intended use", "Data", "Model and training", "Discrimination",
                    "Operating points", "Calibration", "Conformal prediction", "Subgroups",
                    "Error gallery", "Limitations"):
        assert heading in text


def _need_chromium() -> None:
    if not CHROMIUM.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is missing (apt-get install -y chromium)")
        pytest.skip("chromium not installed at /usr/bin/chromium")


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tiny_breast_package):
    _need_chromium()
    from playwright.sync_api import sync_playwright

    report = evaluated(str(tiny_breast_package.path)).report
    html = report.read_text()
    assert "http://" not in html and "https://" not in html.replace("https://medmnist.com", "")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(report.as_uri())
            sizes = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.alt, e.naturalWidth, e.naturalHeight])")
            text = page.inner_text("body")
        finally:
            browser.close()
    assert len(sizes) >= 3  # ROC/PR, reliability, at least one gallery case
    assert all(w > 0 and h > 0 for _, w, h in sizes), sizes
    assert {"ROC and precision-recall curves", "reliability diagram"} <= {a for a, _, _ in sizes}
    assert not BAD_WORDS.search(text), BAD_WORDS.search(text)
    assert "Error gallery" in text and "false negative" in text


def _card(task: TaskSpec, logits: np.ndarray, targets: np.ndarray):
    """A card with post-hoc fits computed the way fit_post_hoc does (no network needed)."""
    from meddx.config import EvaluationConfig
    from meddx.package import ModelCard
    from meddx.training.posthoc import _conformal, _fit_temperature, _operating_points

    cfg = EvaluationConfig()
    fields: dict = {}
    if task.kind != "regression":
        cal = _fit_temperature(task, logits, targets)
        from meddx.statistics.calibration import apply_temperature

        probs = apply_temperature(task, logits, cal.temperature)
        points, default = _operating_points(task, targets, probs, cfg)
        fields = {"calibration": cal, "operating_points": points,
                  "default_operating_point": default,
                  "conformal": _conformal(task, targets, probs, cfg)}
    return ModelCard(name="synthetic", modality="tabular", task=task,
                     network={"name": "mlp"}, preprocessing={}, **fields)


def _synthetic(task: TaskSpec, n: int = 160, seed: int = 0):
    rng = np.random.default_rng(seed)
    k = task.num_classes
    if task.kind == "binary":
        t = rng.integers(0, 2, n)
        z = (2 * t - 1 + rng.normal(0, 1.5, n)).reshape(-1, 1) * 3
    elif task.kind == "multilabel":
        t = rng.integers(0, 2, (n, k)).astype(float)
        z = (2 * t - 1 + rng.normal(0, 1.5, t.shape)) * 2
        t[rng.random(t.shape) < 0.1] = np.nan
    elif task.kind == "regression":
        t = rng.normal(size=n)
        z = (t + rng.normal(0, 0.5, n)).reshape(-1, 1)
    elif task.kind == "ordinal":
        t = rng.integers(0, k, n)
        z = np.stack([(t > j) * 4.0 - 2 + rng.normal(0, 1.5, n) for j in range(k - 1)], 1)
    else:
        t = rng.integers(0, k, n)
        z = rng.normal(size=(n, k)) + 2 * np.eye(k)[t]
    return t, z.astype(np.float32)


@pytest.mark.parametrize("task", [
    TaskSpec(kind="binary", class_names=["disease", "healthy"], positive_class="disease"),
    MULTI,
    TaskSpec(kind="multiclass", class_names=["a", "b", "c"]),
    TaskSpec(kind="ordinal", class_names=["0", "1", "2", "3", "4"]),
    TaskSpec(kind="multilabel", class_names=["x", "y", "z"]),
    TaskSpec(kind="regression", class_names=["value"]),
], ids=lambda t: f"{t.kind}{'+pos' if t.positive_class else ''}")
def test_every_task_kind_renders_a_clean_report(task):
    import pandas as pd

    from meddx.evaluation import sections
    from meddx.statistics.subgroups import subgroup_analysis
    from meddx.training.posthoc import probabilities

    t, z = _synthetic(task)
    train_t, train_z = _synthetic(task, seed=1)
    card = _card(task, train_z, train_t)
    raw, probs = probabilities(card, z, False), probabilities(card, z)
    thr = None if card.operating_point is None else card.operating_point.threshold
    ci = bootstrap_metrics(task, t, probs, thr, n_resamples=50)
    meta = pd.DataFrame({"sex": np.random.default_rng(0).choice(["f", "m"], len(t))})
    result = EvaluationResult(
        model={"name": "m", "version": "1", "sha256": "0" * 64, "path": "/x", "trained_on": "d"},
        dataset="d", split="test", n=len(t), task=task, metrics=dict(ci), threshold=thr,
        notes=list(ci.notes), card=card, targets=t, probs=probs, probs_raw=raw,
        data={"dataset": "d", "modality": "tabular", "info": {"license": "CC BY 4.0"},
              "splits": {"test": {"n": len(t)}}, "patient_level_split": True},
        bootstrap={"resamples": 100, "seed": 0, "by_patient": True},
        operating_points=sections.operating_point_section(task, card, t, probs, 50, 0, None),
        calibration=sections.calibration_section(task, card, t, raw, probs),
        conformal=sections.conformal_section(task, card, t, probs),
        errors=sections.error_cases(task, t, probs, [f"c{i}" for i in range(len(t))], thr),
        subgroups=subgroup_analysis(task, t, probs, meta, thr, n_resamples=50))
    result.subgroups.split = "test"
    html = render_report(result)
    text = re.sub(r"<[^>]+>", " ", re.sub(r"base64,[A-Za-z0-9+/=]+", "", html))
    assert not BAD_WORDS.search(text), BAD_WORDS.search(text)
    assert "Subgroups" in text and ("sex" in text)
    if task.kind != "regression":
        assert "AUROC" in text and "data:image/png;base64," in html
    if task.positive_class:
        assert "sensitivity@0.95" in text
    import json

    from meddx.evaluation.evaluator import json_safe

    json.dumps(json_safe(result.to_dict()), allow_nan=False)
