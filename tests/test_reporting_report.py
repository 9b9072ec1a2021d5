"""The HTML report: self-contained, every figure renders in headless Chromium, and nothing in
it reads nan or None."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from evaluation_support import CHROMIUM, CHROMIUM_ARGS, evaluated
from meddx.evaluation.bootstrap import bootstrap_metrics
from meddx.evaluation.evaluator import EvaluationResult
from meddx.reporting.report import fmt, fmt_ci, render_report
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
