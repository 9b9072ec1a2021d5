"""DeLong against an independent O(mn) computation; McNemar exact and asymptotic."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from meddx.statistics.compare import delong_test, mcnemar_test


def _reference_delong(y, a, b):
    """DeLong, DeLong & Clarke-Pearson (1988), written from the paper: structural components
    from the pairwise kernel psi, covariance of the components, z-test."""
    comps = []
    for s in (a, b):
        pos, neg = s[y == 1], s[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        comps.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    m, n = (y == 1).sum(), (y == 0).sum()
    s10 = np.cov(np.vstack([comps[0][1], comps[1][1]]))
    s01 = np.cov(np.vstack([comps[0][2], comps[1][2]]))
    s = s10 / m + s01 / n
    var = s[0, 0] + s[1, 1] - 2 * s[0, 1]
    z = (comps[0][0] - comps[1][0]) / np.sqrt(var)
    return comps[0][0], comps[1][0], 2 * stats.norm.sf(abs(z))


def test_delong_matches_reference():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    a = (y + rng.normal(0, 1.0, 300)).round(1)  # ties on purpose
    b = 0.7 * a + rng.normal(0, 0.8, 300)
    out = delong_test(y, a, b)
    auc_a, auc_b, p = _reference_delong(y, a, b)
    assert out["auroc_a"] == pytest.approx(auc_a)
    assert out["auroc_b"] == pytest.approx(auc_b)
    assert out["p_value"] == pytest.approx(p, rel=1e-9)
    assert out["low"] < out["difference"] < out["high"]


def test_delong_identical_models_p_is_one():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    assert delong_test(y, s, s)["p_value"] == 1.0


def test_mcnemar_exact_and_chi2():
    a = np.array([1] * 10 + [0] * 2 + [1] * 50)
    b = np.array([0] * 10 + [1] * 2 + [1] * 50)
    out = mcnemar_test(a, b)
    assert out["exact"] == 1 and (out["a_only"], out["b_only"]) == (10, 2)
    assert out["p_value"] == pytest.approx(stats.binomtest(2, 12, 0.5).pvalue)
    a = np.array([1] * 40 + [0] * 20)
    b = np.array([0] * 40 + [1] * 20)
    big = mcnemar_test(a, b)
    assert big["exact"] == 0
    assert big["statistic"] == pytest.approx((20 - 1) ** 2 / 60)
