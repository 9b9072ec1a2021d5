"""Paired comparison of two models on the same cases.

* :func:`delong_test`: DeLong et al. (1988) test of two correlated AUROCs, in the fast
  O(n log n) form of Sun & Xu (2014): placement values from mid-ranks.
* :func:`mcnemar_test`: McNemar's test of two models' correct/incorrect calls at their
  operating points; the exact binomial test when the discordant cases are few.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from meddx.errors import EvaluationError

__all__ = ["delong_test", "mcnemar_test", "delong_covariance"]


def _midrank(x: np.ndarray) -> np.ndarray:
    return stats.rankdata(x, method="average")


def delong_covariance(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs and their DeLong covariance for ``scores`` (M, N) of M models on one truth.

    Returns:
        ``(aucs (M,), covariance (M, M))``.
    """
    y = np.asarray(y).astype(int).reshape(-1)
    s = np.atleast_2d(np.asarray(scores, dtype=float))
    pos, neg = s[:, y == 1], s[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    if m < 2 or n < 2:
        raise EvaluationError(
            f"DeLong's test needs at least two positive and two negative cases, got {m} and {n}"
        )
    tx = np.apply_along_axis(_midrank, 1, pos)
    ty = np.apply_along_axis(_midrank, 1, neg)
    tz = np.apply_along_axis(_midrank, 1, np.concatenate([pos, neg], axis=1))
    aucs = (tz[:, :m].sum(axis=1) / m - (m + 1) / 2) / n
    v01 = (tz[:, :m] - tx) / n  # placement of each positive among the negatives
    v10 = 1.0 - (tz[:, m:] - ty) / m  # of each negative among the positives
    cov = np.atleast_2d(np.cov(v01)) / m + np.atleast_2d(np.cov(v10)) / n
    return aucs, cov


def delong_test(y: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
                confidence: float = 0.95) -> dict[str, float]:
    """Two-sided DeLong test of AUROC(a) = AUROC(b) on the same cases.

    Args:
        y: 0/1 truth (1 = positive class).
        scores_a, scores_b: the two models' positive-class scores.
        confidence: level of the interval of the difference.

    Returns:
        ``auroc_a``, ``auroc_b``, ``difference`` (a - b), ``se``, ``z``, ``p_value``, ``low``,
        ``high`` (interval of the difference).
    """
    if len(scores_a) != len(y) or len(scores_b) != len(y):
        raise EvaluationError("both models must be scored on the same cases")
    aucs, cov = delong_covariance(y, np.vstack([scores_a, scores_b]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = float(np.sqrt(max(var, 0.0)))
    if se == 0.0:
        z, p = 0.0 if diff == 0 else np.inf, 1.0 if diff == 0 else 0.0
    else:
        z = diff / se
        p = float(2 * stats.norm.sf(abs(z)))
    half = stats.norm.ppf(0.5 + confidence / 2) * se
    return {"auroc_a": float(aucs[0]), "auroc_b": float(aucs[1]), "difference": diff,
            "se": se, "z": float(z), "p_value": float(p), "low": diff - half, "high": diff + half}


def mcnemar_test(correct_a: np.ndarray, correct_b: np.ndarray,
                 exact_below: int = 25) -> dict[str, float]:
    """McNemar's test on paired correct (1) / incorrect (0) calls.

    Args:
        correct_a, correct_b: per case, whether each model's call was right.
        exact_below: use the exact binomial test when fewer discordant pairs than this.

    Returns:
        ``a_only`` (a right, b wrong), ``b_only``, ``statistic``, ``p_value``, ``exact`` (1/0).
    """
    a = np.asarray(correct_a).astype(bool)
    b = np.asarray(correct_b).astype(bool)
    if a.shape != b.shape:
        raise EvaluationError("both models must be scored on the same cases")
    n01, n10 = int((a & ~b).sum()), int((~a & b).sum())
    k = n01 + n10
    if k == 0:
        return {"a_only": 0, "b_only": 0, "statistic": 0.0, "p_value": 1.0, "exact": 1}
    if k < exact_below:
        p = stats.binomtest(min(n01, n10), k, 0.5).pvalue
        return {"a_only": n01, "b_only": n10, "statistic": float(min(n01, n10)),
                "p_value": float(min(p, 1.0)), "exact": 1}
    stat = (abs(n01 - n10) - 1) ** 2 / k  # continuity-corrected
    return {"a_only": n01, "b_only": n10, "statistic": float(stat),
            "p_value": float(stats.chi2.sf(stat, 1)), "exact": 0}
