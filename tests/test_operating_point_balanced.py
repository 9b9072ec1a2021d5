"""The ``balanced`` operating point (sensitivity = PPV on calib) on hand-computed cases; it is
fitted for every binary task; alerts per 100 and min(Se, PPV) with CIs at test; the report
states the trade-off between the points."""

from __future__ import annotations

import re

import numpy as np
import pytest

from meddx.config import EvaluationConfig
from meddx.statistics.alerts import alert_figures
from meddx.statistics.operating_points import (
    ThresholdSelector,
    balanced_threshold,
    operating_point_name,
)
from meddx.tasks import TaskSpec

TASK = TaskSpec(kind="binary", class_names=["survived", "died"], positive_class="died",
                label_values=[0, 1])


def test_balanced_known_answer():
    # P = 4: the top 4 hold 3 deaths, so Se = PPV = 3/4 at the 4th score, 0.70
    p = np.array([0.95, 0.90, 0.80, 0.70, 0.60, 0.50, 0.40, 0.30, 0.20, 0.10])
    y = np.array([1, 0, 1, 1, 0, 0, 1, 0, 0, 0])
    sel = ThresholdSelector("balanced", positive_class="died").fit(y, p)
    assert sel.threshold_ == 0.70
    assert sel.calib_sensitivity_ == sel.calib_ppv_ == 0.75
    assert sel.calib_specificity_ == 5 / 6
    card = sel.to_card()
    assert (card.method, card.target, card.calib_ppv) == ("balanced", None, 0.75)
    assert sel.name == operating_point_name("balanced", None) == "balanced"


def test_balanced_is_the_crossing_not_the_event1_argmax():
    # P = 4; flagging 4 gives Se = PPV = 2/4; flagging 6 would score min(Se, PPV) = 4/6 on
    # these cases (two lucky deaths just below the cut) — the balanced point stays at the
    # crossing: as many alerts as deaths
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    y = np.array([1, 0, 0, 1, 1, 1, 0, 0, 0, 0])
    assert balanced_threshold(y, p) == 0.6
    from meddx.modalities.ehr.score import event1_threshold

    assert event1_threshold(y, p, "argmax") == (0.4, pytest.approx(4 / 6))


def test_balanced_with_a_tie_across_the_cut():
    # P = 3; the 4th..2nd scores tie at 0.8, so k = 3 is not a cut. Cuts: k=1 (|1/3-1| = 2/3),
    # k=4 (Se 2/3, PPV 2/4: gap 1/6), k=5 (2/3 vs 2/5: 4/15), k=6 (1 vs 1/2): k=4 wins
    p = np.array([0.9, 0.8, 0.8, 0.8, 0.3, 0.2])
    y = np.array([1, 1, 0, 0, 0, 1])
    assert balanced_threshold(y, p) == 0.8
    # all scores tied: the only cut flags everyone
    assert balanced_threshold(np.array([1, 0, 0]), np.full(3, 0.4)) == 0.4


def test_every_binary_card_gets_a_balanced_point_and_it_can_be_the_default():
    from meddx.training.posthoc import _operating_points

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, 400), 0, 1)
    probs = np.stack([1 - p, p], axis=1)
    cfg = EvaluationConfig(default_operating_point="balanced", target_sensitivity=0.8)
    points, default = _operating_points(TASK, y, probs, cfg)
    assert list(points) == ["sensitivity@0.8", "specificity@0.9", "youden", "balanced"]
    assert default == "balanced"
    assert points["balanced"]["threshold"] == balanced_threshold(y, p)
    assert points["balanced"]["calib_sensitivity"] == points["balanced"]["calib_ppv"]


def test_alert_figures_known_answer_and_interval():
    p = np.array([0.95, 0.90, 0.80, 0.70, 0.60, 0.50, 0.40, 0.30, 0.20, 0.10] * 10)
    y = np.array([1, 0, 1, 1, 0, 0, 1, 0, 0, 0] * 10)
    probs = np.stack([1 - p, p], axis=1)
    out = alert_figures(TASK, y, probs, 0.70, n_resamples=300, seed=1)
    assert out["alerts_per_100"]["value"] == 40.0
    assert out["min_sensitivity_ppv"]["value"] == 0.75
    for v in out.values():
        assert v["low"] <= v["value"] <= v["high"] and v["low"] < v["high"]
    nobody = alert_figures(TASK, y, probs, 2.0, n_resamples=0)
    assert nobody["alerts_per_100"]["value"] == 0 and nobody["min_sensitivity_ppv"]["value"] == 0


def test_report_shows_event1_alerts_and_the_tradeoff():
    from meddx.evaluation import sections
    from meddx.evaluation.evaluator import EvaluationResult
    from meddx.package import ModelCard
    from meddx.reporting.report import render_report
    from meddx.statistics.bootstrap import bootstrap_metrics
    from meddx.training.posthoc import _operating_points

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.35 * y + rng.uniform(0, 0.65, 300), 0, 1)
    probs = np.stack([1 - p, p], axis=1)
    points, default = _operating_points(TASK, y, probs, EvaluationConfig(
        default_operating_point="balanced", target_sensitivity=0.8))
    card = ModelCard(name="icu", modality="ehr", task=TASK, network={"name": "grud"},
                     preprocessing={}, operating_points=points, default_operating_point=default)
    thr = card.operating_point.threshold
    ci = bootstrap_metrics(TASK, y, probs, thr, n_resamples=50)
    ops = sections.operating_point_section(TASK, card, y, probs, 50, 0, None)
    assert set(ops["balanced"]["metrics"]) >= {"min_sensitivity_ppv", "alerts_per_100", "ppv"}
    dropped = {"total": 3, "by_reason": {"empty_parameter": 2, "unknown_parameter": 1},
               "reasons": {"empty_parameter": "empty parameter name",
                           "unknown_parameter": "parameter not in the mapping table"},
               "by_split": {"train": {"stays": 10, "stays_with_dropped_lines": 1, "lines": 2,
                                      "by_reason": {"empty_parameter": 2}},
                            "test": {"stays": 5, "stays_with_dropped_lines": 1, "lines": 1,
                                     "by_reason": {"unknown_parameter": 1}}},
               "refused_stays": {"stays": 0, "stays_with_dropped_lines": 0, "lines": 0,
                                 "by_reason": {}}}
    result = EvaluationResult(
        model={"name": "icu", "version": "1", "sha256": "0" * 64, "path": "/x",
               "trained_on": "d"},
        dataset="d", split="test", n=300, task=TASK, metrics=dict(ci), threshold=thr,
        card=card, targets=y, probs=probs, probs_raw=probs, operating_points=ops,
        data={"dataset": "d", "modality": "ehr", "info": {}, "splits": {"test": {"n": 300}},
              "patient_level_split": True, "dropped_lines": dropped},
        bootstrap={"resamples": 50, "seed": 0, "by_patient": False})
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", render_report(result)))
    assert "min(Se, PPV)" in text and "alerts per 100 cases" in text
    a = ops["balanced"]["metrics"]["alerts_per_100"]["value"]
    assert f"balanced (default): {a:.1f} alerts per 100 cases" in text
    assert re.search(r"sensitivity@0\.8: [\d.]+ alerts per 100 cases, .* against the default, "
                     r"\+[\d.]+ alerts per 100 for \+\d+ points of sensitivity", text)
    assert "Lines left out while reading" in text
    assert "empty parameter name (empty_parameter) 2 0 0 2" in text
