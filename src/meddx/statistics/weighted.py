"""The metrics of :mod:`meddx.statistics.metrics`, vectorised over many sample weightings.

A bootstrap resample is a vector of multiplicities (how often each case was drawn). With a
weight matrix ``W`` (B, N) every metric of B resamples is computed at once: the cases are sorted
once, and AUROC (Mann-Whitney with ties), average precision and the confusion counts become
cumulative sums and matrix products over ``W``. With ``W`` all ones the results equal
scikit-learn's point estimates (the tests check every key).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from meddx.statistics.metrics import binary_view, check_inputs
from meddx.tasks import TaskSpec

__all__ = ["weighted_metrics", "weighted_auroc", "weighted_average_precision"]


def _groups(scores: np.ndarray, descending: bool) -> tuple[np.ndarray, np.ndarray]:
    """Sort order and the start index of each run of equal scores."""
    order = np.argsort(-scores if descending else scores, kind="mergesort")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return order, starts


def _per_group(W: np.ndarray, y: np.ndarray, order: np.ndarray,
               starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    Ws = W[:, order]
    ys = y[order].astype(bool)
    pos = np.add.reduceat(np.where(ys, Ws, 0.0), starts, axis=1)
    neg = np.add.reduceat(np.where(ys, 0.0, Ws), starts, axis=1)
    return pos, neg


def weighted_auroc(y: np.ndarray, s: np.ndarray, W: np.ndarray) -> np.ndarray:
    """AUROC of 0/1 ``y`` against scores ``s`` under each row of weights ``W`` (B, N)."""
    order, starts = _groups(s, descending=False)
    pos, neg = _per_group(W, y, order, starts)
    neg_below = np.cumsum(neg, axis=1) - neg
    num = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def weighted_average_precision(y: np.ndarray, s: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Average precision (scikit-learn's step definition) under each row of ``W``."""
    order, starts = _groups(s, descending=True)
    pos, neg = _per_group(W, y, order, starts)
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        total = pos.sum(axis=1)
        ap = (pos * precision).sum(axis=1) / total
        # scikit-learn: undefined without positives; with positives but no negatives, 1
        return np.where(neg.sum(axis=1) > 0, np.where(total > 0, ap, np.nan),
                        np.where(total > 0, 1.0, np.nan))


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def _ranking(out: dict, y: np.ndarray, p: np.ndarray, W: np.ndarray, suffix: str) -> None:
    auc = weighted_auroc(y, p, W)
    ap = weighted_average_precision(y, p, W)
    # a resample (or the data) with one class only: both undefined
    one_class = ~np.isfinite(auc)
    out[f"auroc{suffix}"] = auc
    out[f"auprc{suffix}"] = np.where(one_class, np.nan, ap)


def _at_threshold(out: dict, y: np.ndarray, p: np.ndarray, W: np.ndarray, threshold: float,
                  suffix: str, with_accuracy: bool) -> None:
    pred = p >= threshold
    yb = y.astype(bool)
    ind = np.stack([yb & pred, yb & ~pred, ~yb & pred, ~yb & ~pred], axis=1).astype(float)
    tp, fn, fp, tn = (W @ ind).T
    out[f"sensitivity{suffix}"] = sens = _div(tp, tp + fn)
    out[f"specificity{suffix}"] = spec = _div(tn, tn + fp)
    out[f"ppv{suffix}"] = _div(tp, tp + fp)
    out[f"npv{suffix}"] = _div(tn, tn + fn)
    out[f"f1{suffix}"] = _div(2 * tp, 2 * tp + fp + fn)
    if with_accuracy:
        out[f"accuracy{suffix}"] = _div(tp + tn, tp + tn + fp + fn)
        out[f"balanced_accuracy{suffix}"] = 0.5 * (sens + spec)


def _brier(W: np.ndarray, sq: np.ndarray) -> np.ndarray:
    return _div(W @ sq, W.sum(axis=1))


def _binary(task: TaskSpec, t: np.ndarray, p: np.ndarray, W: np.ndarray, thr: float) -> dict:
    out: dict[str, np.ndarray] = {}
    y, pp = binary_view(task, t, p)  # type: ignore[misc]
    _ranking(out, y, pp, W, "")
    for k, name in enumerate(task.class_names):
        yk = y if k == task.positive_index else 1 - y
        _ranking(out, yk, p[:, k], W, f"[{name}]")
    _at_threshold(out, y, pp, W, thr, "", with_accuracy=True)
    out["brier"] = _brier(W, (pp - y) ** 2)
    return out


def _multiclass(task: TaskSpec, t: np.ndarray, p: np.ndarray, W: np.ndarray, thr: float) -> dict:
    out: dict[str, np.ndarray] = {}
    K = task.num_classes
    for k, name in enumerate(task.class_names):
        _ranking(out, (t == k).astype(int), p[:, k], W, f"[{name}]")
    for key in ("auroc", "auprc"):
        per = np.stack([out[f"{key}[{c}]"] for c in task.class_names], axis=1)
        out[key] = _nanmean(per)
    pred = p.argmax(axis=1)
    onehot = np.eye(K)[t]
    out["accuracy"] = _div(W @ (pred == t).astype(float), W.sum(axis=1))
    recall = _div(W @ (onehot * (pred == t)[:, None]), W @ onehot)
    out["balanced_accuracy"] = _nanmean(recall)
    out["brier"] = _brier(W, ((p - onehot) ** 2).sum(axis=1))
    view = binary_view(task, t, p)
    if view is not None:
        _at_threshold(out, view[0], view[1], W, thr, "", with_accuracy=False)
    if task.kind == "ordinal":
        out["qwk"] = _qwk(W, t, pred, K)
        out["mae_grade"] = _brier(W, np.abs(pred - t).astype(float))
    return out


def _nanmean(a: np.ndarray) -> np.ndarray:
    finite = np.isfinite(a)
    n = finite.sum(axis=1)
    total = np.where(finite, a, 0.0).sum(axis=1)
    return _div(total, n.astype(float))


def _qwk(W: np.ndarray, t: np.ndarray, pred: np.ndarray, K: int) -> np.ndarray:
    cells = np.eye(K * K)[t * K + pred]  # (N, K*K) one-hot of the confusion cell
    observed = (W @ cells).reshape(-1, K, K)
    total = observed.sum(axis=(1, 2), keepdims=True)
    expected = (observed.sum(axis=2, keepdims=True) * observed.sum(axis=1, keepdims=True)
                / np.where(total > 0, total, 1))
    i, j = np.indices((K, K))
    w = (i - j) ** 2
    num = (w * observed).sum(axis=(1, 2))
    den = (w * expected).sum(axis=(1, 2))
    return 1.0 - _div(num, den)


def _multilabel(task: TaskSpec, t: np.ndarray, p: np.ndarray, W: np.ndarray,
                threshold: float | Sequence[float]) -> dict:
    out: dict[str, np.ndarray] = {}
    thr = np.broadcast_to(np.asarray(threshold, dtype=float), (task.num_classes,))
    keys = ("auroc", "auprc", "sensitivity", "specificity", "ppv", "npv", "f1", "accuracy",
            "balanced_accuracy", "brier")
    for j, name in enumerate(task.class_names):
        known = ~np.isnan(t[:, j])
        sfx = f"[{name}]"
        if not known.any():
            for key in keys:
                out[f"{key}{sfx}"] = np.full(W.shape[0], np.nan)
            continue
        y, pj, Wj = t[known, j].astype(int), p[known, j], W[:, known]
        _ranking(out, y, pj, Wj, sfx)
        _at_threshold(out, y, pj, Wj, float(thr[j]), sfx, with_accuracy=True)
        out[f"brier{sfx}"] = _brier(Wj, (pj - y) ** 2)
    for key in keys:
        out[key] = _nanmean(np.stack([out[f"{key}[{c}]"] for c in task.class_names], axis=1))
    return out


def _regression(t: np.ndarray, p: np.ndarray, W: np.ndarray) -> dict:
    y, yhat = t.reshape(-1), p.reshape(-1)
    total = W.sum(axis=1)
    mean = _div(W @ y, total)
    ss_res = W @ (y - yhat) ** 2
    ss_tot = (W * (y[None] - mean[:, None]) ** 2).sum(axis=1)
    return {
        "mae": _div(W @ np.abs(y - yhat), total),
        "rmse": np.sqrt(_div(ss_res, total)),
        "r2": 1.0 - _div(ss_res, ss_tot),
    }


def weighted_metrics(
    task: TaskSpec,
    targets: np.ndarray,
    probs: np.ndarray,
    W: np.ndarray,
    threshold: float | Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """Every metric of :func:`~meddx.statistics.metrics.compute_metrics`, one value per row of
    ``W`` (B, N) non-negative case weights."""
    t, p = check_inputs(task, targets, probs)
    W = np.atleast_2d(np.asarray(W, dtype=float))
    thr = 0.5 if threshold is None else threshold
    if task.kind == "binary":
        return _binary(task, t, p, W, float(thr))  # type: ignore[arg-type]
    if task.kind in ("multiclass", "ordinal"):
        return _multiclass(task, t, p, W, float(thr))  # type: ignore[arg-type]
    if task.kind == "multilabel":
        return _multilabel(task, t, p, W, thr)
    return _regression(t, p, W)
