"""What a decision threshold means at the bedside: alerts per 100 cases and min(Se, PPV).

``min(sensitivity, PPV)`` is the PhysioNet/CinC 2012 challenge's Event 1 score; it is high
only when most positive cases are flagged *and* most flags are right, which is what a ward
alert that must not cause alarm fatigue needs. Alerts per 100 cases is the work a threshold
creates. Both come with percentile bootstrap intervals drawn exactly like
:func:`meddx.statistics.bootstrap.bootstrap_metrics` draws them (same strata, patients as
units, same seed → the same resamples), so they sit beside its sensitivity and PPV.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from meddx.statistics.bootstrap import _BLOCK_CELLS, _units_and_strata, resample_weights
from meddx.statistics.metrics import binary_view, check_inputs
from meddx.tasks import TaskSpec

__all__ = ["alert_figures", "ALERT_METRICS"]

ALERT_METRICS = ("min_sensitivity_ppv", "alerts_per_100")


def _figures(tp: np.ndarray, flagged: np.ndarray, positives: np.ndarray,
             n: np.ndarray) -> dict[str, np.ndarray]:
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.where(positives > 0, tp / positives, np.nan)
        ppv = np.where(flagged > 0, tp / flagged, 0.0)  # the challenge's convention
        return {"min_sensitivity_ppv": np.minimum(se, ppv),
                "alerts_per_100": np.where(n > 0, 100.0 * flagged / n, np.nan)}


def alert_figures(task: TaskSpec, targets: Any, probs: Any, threshold: float,
                  patient_ids: Sequence[Any] | None = None, n_resamples: int = 1000,
                  seed: int = 0, confidence: float = 0.95) -> dict[str, dict[str, float]]:
    """``min_sensitivity_ppv`` and ``alerts_per_100`` of ``p >= threshold`` with CIs.

    Args:
        task: a task with a positive class (binary view).
        targets / probs: encoded targets and per-class probabilities.
        threshold: the decision threshold on the positive class.
        patient_ids: resample patients instead of cases.
        n_resamples: bootstrap resamples (0: point estimates, intervals NaN).

    Returns:
        ``{name: {"value", "low", "high"}}``; empty when the task has no positive class.
    """
    t, p = check_inputs(task, targets, probs)
    view = binary_view(task, t, p)
    if view is None:
        return {}
    y, pp = view
    pos = (y == 1).astype(float)
    flag = (pp >= threshold).astype(float)
    point = _figures(np.array([(pos * flag).sum()]), np.array([flag.sum()]),
                     np.array([pos.sum()]), np.array([float(len(y))]))
    out = {k: {"value": float(v[0]), "low": float("nan"), "high": float("nan")}
           for k, v in point.items()}
    if n_resamples <= 0 or len(y) == 0:
        return out
    unit, stratum = _units_and_strata(task, t, patient_ids)
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_CELLS // max(len(t), 1))
    parts, done = [], 0
    while done < n_resamples:
        b = min(block, n_resamples - done)
        W = resample_weights(unit, stratum, b, rng)
        parts.append(_figures(W @ (pos * flag), W @ flag, W @ pos, W.sum(axis=1)))
        done += b
    lo_q, hi_q = 50 * (1 - confidence), 100 - 50 * (1 - confidence)
    for key in out:
        samples = np.concatenate([part[key] for part in parts])
        finite = samples[np.isfinite(samples)]
        if finite.size > 1 and finite.size >= 0.9 * samples.size:
            out[key]["low"], out[key]["high"] = (float(x) for x in
                                                 np.percentile(finite, [lo_q, hi_q]))
    return out
