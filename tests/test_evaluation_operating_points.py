"""Threshold selection on calibration data."""

from __future__ import annotations

import numpy as np
import pytest

from meddx.errors import EvaluationError
from meddx.statistics.operating_points import ThresholdSelector


def _data(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = 1 / (1 + np.exp(-(2 * y - 1 + rng.normal(0, 1.2, n))))
    return y, p


def test_sensitivity_target_is_reached_with_the_most_specific_threshold():
    y, p = _data()
    sel = ThresholdSelector("sensitivity", 0.95).fit(y, p)
    assert sel.calib_sensitivity_ >= 0.95
    # one step higher would miss the target
    higher = np.sort(np.unique(p))
    nxt = higher[higher > sel.threshold_][0]
    assert (p[y == 1] >= nxt).mean() < 0.95
    card = sel.to_card("malignant")
    assert card.threshold == sel.threshold_ and card.fitted_on == "calib"
    assert card.positive_class == "malignant" and card.target == 0.95


def test_specificity_and_youden():
    y, p = _data()
    spec = ThresholdSelector("specificity", 0.9).fit(y, p)
    assert spec.calib_specificity_ >= 0.9
    you = ThresholdSelector("youden").fit(y, p)
    j = you.calib_sensitivity_ + you.calib_specificity_ - 1
    for t in np.quantile(p, np.linspace(0.05, 0.95, 19)):
        pred = p >= t
        assert j >= pred[y == 1].mean() + (~pred[y == 0]).mean() - 1 - 1e-12
    assert you.to_card("x").target is None


def test_one_class_calibration_split_is_a_clear_error():
    with pytest.raises(EvaluationError, match="positive"):
        ThresholdSelector().fit(np.zeros(20), np.linspace(0, 1, 20))
    with pytest.raises(EvaluationError):
        ThresholdSelector("best")
