"""PhysioNet/CinC Challenge 2012 Event 1 score: min(sensitivity, positive predictive value).

The challenge scored binary predictions of in-hospital death; the winner reached 0.5353 on the
hidden set-c. A fair figure fixes the threshold before the test split is read: choose it on the
calibration split with :func:`event1_threshold`, then score test with :func:`event1_score`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from meddx.errors import EvaluationError

__all__ = ["event1_score", "event1_threshold", "bootstrap_event1"]


def _check(y_true: Any, y_score: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(int).reshape(-1)
    s = np.asarray(y_score, dtype=float).reshape(-1)
    if y.shape != s.shape:
        raise EvaluationError(f"{y.size} labels but {s.size} scores")
    if not np.isin(y, (0, 1)).all():
        raise EvaluationError("Event 1 needs 0/1 labels (1 = died)")
    if np.isnan(s).any():
        raise EvaluationError("scores contain NaN; drop or impute those cases first")
    if y.sum() == 0:
        raise EvaluationError("no positive case: sensitivity is undefined")
    return y, s


def event1_score(y_true: Any, y_score: Any, threshold: float) -> dict[str, float]:
    """Event 1 score of the decisions ``score >= threshold``.

    Returns:
        ``{"event1", "sensitivity", "ppv", "threshold", "n_flagged"}``; PPV is 0 when nothing
        is flagged (the challenge's convention: such an entry scores 0).
    """
    y, s = _check(y_true, y_score)
    flagged = s >= threshold
    tp = int((flagged & (y == 1)).sum())
    se = tp / int(y.sum())
    ppv = tp / int(flagged.sum()) if flagged.any() else 0.0
    return {"event1": float(min(se, ppv)), "sensitivity": float(se), "ppv": float(ppv),
            "threshold": float(threshold), "n_flagged": int(flagged.sum())}


def event1_threshold(y_true: Any, y_score: Any, method: str = "argmax") -> tuple[float, float]:
    """A threshold for Event 1, chosen on these cases (use the calibration split).

    Args:
        method: ``argmax``: the cut that maximises Event 1 on these cases (exact, but a step
            function of a few hundred cases: noisy); ``prevalence``: flag as many cases as
            there are deaths, the point where sensitivity equals PPV — where min(Se, PPV)
            peaks when both move smoothly — which depends only on a quantile of the scores
            and the death rate, so it varies less from one calibration sample to the next.

    Returns:
        (threshold, the Event 1 score it reaches on these cases).
    """
    y, s = _check(y_true, y_score)
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    if method == "prevalence":
        thr = float(s_sorted[int(y.sum()) - 1])
        return thr, event1_score(y, s, thr)["event1"]
    if method != "argmax":
        raise EvaluationError(f"unknown Event 1 threshold method {method!r}; "
                              "choose argmax or prevalence")
    tp = np.cumsum(y_sorted)
    flagged = np.arange(1, len(s) + 1)
    # only cut between distinct scores: ties are flagged together
    last_of_tie = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    score = np.minimum(tp / y.sum(), tp / flagged)
    score = np.where(last_of_tie, score, -1.0)
    best = int(np.argmax(score))
    return float(s_sorted[best]), float(score[best])


def bootstrap_event1(y_true: Any, y_score: Any, threshold: float, n_resamples: int = 1000,
                     seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Event 1 at a fixed threshold with a stratified percentile bootstrap CI."""
    y, s = _check(y_true, y_score)
    point = event1_score(y, s, threshold)["event1"]
    if n_resamples <= 0:
        return {"event1": point, "low": float("nan"), "high": float("nan"),
                "threshold": float(threshold)}
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    values = np.empty(n_resamples)
    for b in range(n_resamples):
        idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        values[b] = event1_score(y[idx], s[idx], threshold)["event1"]
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"event1": point, "low": float(lo), "high": float(hi), "threshold": float(threshold)}
