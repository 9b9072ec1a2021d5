"""The PhysioNet/CinC Challenge 2017 score: the mean F1 of normal, AF and other rhythm.

The challenge scored ``(F1_N + F1_A + F1_O) / 3`` (noisy records count in the confusion
matrix but their F1 is not averaged in). F1 here is scikit-learn's per-class F1, which equals
the challenge's ``2·N_kk / (Σ row k + Σ column k)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from meddx.errors import EvaluationError

__all__ = ["challenge_score", "bootstrap_challenge_score"]

DEFAULT_SCORED = ("N", "A", "O")


def _as_index(y: Any, classes: Sequence[str]) -> np.ndarray:
    arr = np.asarray(y)
    if arr.dtype.kind in "iu":
        return arr.astype(int)
    lookup = {c: i for i, c in enumerate(classes)}
    try:
        return np.array([lookup[str(v)] for v in arr], dtype=int)
    except KeyError as e:
        raise EvaluationError(f"label {e.args[0]!r} is not one of {list(classes)}") from e


def challenge_score(y_true: Any, y_pred: Any, classes: Sequence[str] = ("N", "A", "O", "~"),
                    scored: Sequence[str] = DEFAULT_SCORED) -> dict[str, Any]:
    """Challenge 2017 score with per-class F1 and the confusion matrix.

    Args:
        y_true / y_pred: class indices into ``classes`` or raw labels (``"N"``, ``"A"`` …).
        classes: all classes, in index order.
        scored: the classes whose F1 is averaged (the challenge: N, A, O).

    Returns:
        ``{"score", "f1" {class: F1}, "confusion" (rows true, columns predicted),
        "classes", "scored", "n"}``.
    """
    from sklearn.metrics import confusion_matrix, f1_score

    classes = [str(c) for c in classes]
    missing = [c for c in scored if c not in classes]
    if missing:
        raise EvaluationError(f"scored classes {missing} are not among {classes}")
    t, p = _as_index(y_true, classes), _as_index(y_pred, classes)
    if t.shape != p.shape or t.size == 0:
        raise EvaluationError(f"need equal, non-empty label arrays, got {t.shape} and {p.shape}")
    labels = list(range(len(classes)))
    f1 = f1_score(t, p, labels=labels, average=None, zero_division=0)
    per_class = {c: float(v) for c, v in zip(classes, f1, strict=True)}
    return {
        "score": float(np.mean([per_class[c] for c in scored])),
        "f1": per_class,
        "confusion": confusion_matrix(t, p, labels=labels).tolist(),
        "classes": classes,
        "scored": list(scored),
        "n": int(t.size),
    }


def bootstrap_challenge_score(y_true: Any, y_pred: Any, classes: Sequence[str] = ("N", "A", "O", "~"),
                              scored: Sequence[str] = DEFAULT_SCORED, n_boot: int = 1000,
                              alpha: float = 0.05, seed: int = 0) -> dict[str, float]:
    """Point estimate and percentile bootstrap interval of the challenge score (records
    resampled with replacement)."""
    classes = [str(c) for c in classes]
    t, p = _as_index(y_true, classes), _as_index(y_pred, classes)
    point = challenge_score(t, p, classes, scored)["score"]
    rng = np.random.default_rng(seed)
    scores = np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(0, t.size, t.size)
        scores[b] = challenge_score(t[idx], p[idx], classes, scored)["score"]
    lo, hi = np.quantile(scores, [alpha / 2, 1 - alpha / 2])
    return {"score": point, "ci_low": float(lo), "ci_high": float(hi), "n_boot": n_boot,
            "alpha": alpha}
