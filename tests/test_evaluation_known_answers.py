"""Known-answer tests of the issue's acceptance: bootstrap coverage, ECE, temperature scaling,
conformal coverage (LAC, APS, multilabel)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from meddx.statistics.bootstrap import bootstrap_metrics, resample_weights
from meddx.statistics.calibration import (
    TemperatureScaler,
    apply_temperature,
    expected_calibration_error,
)
from meddx.statistics.conformal import ConformalClassifier
from meddx.tasks import TaskSpec

BINARY = TaskSpec(kind="binary", class_names=["disease", "healthy"], positive_class="disease")
MULTI = TaskSpec(kind="multiclass", class_names=["a", "b", "c", "d"])


def _binormal(rng, n_pos, n_neg, d):
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    s = np.r_[rng.normal(d, 1, n_pos), rng.normal(0, 1, n_neg)]
    p = 1 / (1 + np.exp(-s))
    return y, np.column_stack([p, 1 - p])


@pytest.mark.slow
def test_bootstrap_ci_covers_known_auc_in_90_of_100_repeats():
    d = 1.0
    true_auc = stats.norm.cdf(d / np.sqrt(2))
    covered = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        y, probs = _binormal(rng, 80, 120, d)
        ci = bootstrap_metrics(BINARY, y, probs, n_resamples=1000, seed=seed)["auroc"]
        covered += ci["low"] <= true_auc <= ci["high"]
    assert covered >= 90


def test_bootstrap_is_seeded_stratified_and_clustered():
    rng = np.random.default_rng(0)
    y, probs = _binormal(rng, 30, 70, 1.0)
    a = bootstrap_metrics(BINARY, y, probs, n_resamples=200, seed=3)
    b = bootstrap_metrics(BINARY, y, probs, n_resamples=200, seed=3)
    assert a == b
    assert a["auroc"]["low"] < a["auroc"]["value"] < a["auroc"]["high"]
    # stratified: every resample keeps 30 positive and 70 negative units
    unit, stratum = np.arange(100), y.copy()
    W = resample_weights(unit, stratum, 50, np.random.default_rng(1))
    assert (W[:, y == 1].sum(1) == 30).all() and (W[:, y == 0].sum(1) == 70).all()
    # cluster: cases of one patient always share a multiplicity
    patients = [f"p{i // 4}" for i in range(100)]
    from meddx.statistics.bootstrap import _units_and_strata

    unit, stratum = _units_and_strata(BINARY, y, patients)
    W = resample_weights(unit, stratum, 50, np.random.default_rng(2))
    assert (W.reshape(50, 25, 4) == W.reshape(50, 25, 4)[:, :, :1]).all()
    wide = bootstrap_metrics(BINARY, y, probs, patient_ids=patients, n_resamples=300, seed=0)
    assert np.isfinite(wide["auroc"]["low"])


def test_no_resamples_gives_point_estimates_only():
    rng = np.random.default_rng(0)
    y, probs = _binormal(rng, 20, 20, 1.0)
    out = bootstrap_metrics(BINARY, y, probs, n_resamples=0)
    assert np.isfinite(out["auroc"]["value"]) and np.isnan(out["auroc"]["low"])


def test_ece_is_zero_on_perfectly_calibrated_scores():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 200_000)
    y = (rng.uniform(0, 1, p.size) < p).astype(int)
    probs = np.column_stack([p, 1 - p])
    assert expected_calibration_error(np.where(y == 1, 0, 1), probs, positive_index=0) < 0.01


def test_temperature_scaling_lowers_ece_on_overconfident_logits():
    rng = np.random.default_rng(0)
    n, k = 4000, 4
    y = rng.integers(0, k, n)
    true_logits = rng.normal(size=(n, k)) + 1.0 * np.eye(k)[y]
    # draw labels from the true probabilities, then make the model 3x over-confident
    probs_true = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in probs_true])
    over = 3.0 * true_logits
    calib, test = slice(0, 2000), slice(2000, None)
    scaler = TemperatureScaler(MULTI).fit(over[calib], y[calib])
    assert scaler.temperature_ == pytest.approx(3.0, rel=0.15)
    before = expected_calibration_error(y[test], apply_temperature(MULTI, over[test], 1.0))
    after = expected_calibration_error(y[test], scaler.transform(over[test]))
    assert after < 0.5 * before and after < 0.03


def _dirichlet_problem(rng, n, k):
    probs = rng.dirichlet(np.full(k, 0.7), size=n)
    y = np.array([rng.choice(k, p=row) for row in probs])
    return probs, y


@pytest.mark.parametrize("method", ["lac", "aps"])
def test_conformal_coverage_within_3_percent(method):
    rng = np.random.default_rng(1)
    alpha = 0.1
    probs, y = _dirichlet_problem(rng, 6000, 5)
    cal, test = slice(0, 3000), slice(3000, None)
    cp = ConformalClassifier(method, alpha).fit(probs[cal], y[cal])
    sets = cp.predict_sets(probs[test])
    coverage = sets[np.arange(3000), y[test]].mean()
    assert abs(coverage - (1 - alpha)) <= 0.03


def test_conformal_multilabel_coverage_per_label():
    rng = np.random.default_rng(2)
    p = rng.uniform(0, 1, (6000, 3))
    y = (rng.uniform(0, 1, p.shape) < p).astype(float)
    y[rng.random(y.shape) < 0.1] = np.nan
    cp = ConformalClassifier("lac", 0.1, multilabel=True).fit(p[:3000], y[:3000])
    sets = cp.predict_sets(p[3000:])  # (N, L, 2)
    for j in range(3):
        known = ~np.isnan(y[3000:, j])
        truth = y[3000:, j][known].astype(int)
        cov = sets[known, j][np.arange(known.sum()), truth].mean()
        assert abs(cov - 0.9) <= 0.03
