"""Point estimates of the clinical metrics for every task kind (scikit-learn underneath).

Inputs are the *encoded* targets (see :meth:`meddx.tasks.TaskSpec.encode`: binary 0/1 with 1 =
positive class; multiclass and ordinal a class index; multilabel an (N, L) float array with NaN
for missing labels; regression a float) and per-class probabilities ``probs`` (N, K) in
``class_names`` order (binary: two columns, as :meth:`TaskSpec.probabilities` returns them).

Keys (``<c>`` is a class or label name):

* ``auroc`` (macro one-vs-rest), ``auroc[<c>]``; ``auprc``, ``auprc[<c>]``;
* ``accuracy``, ``balanced_accuracy``; ``brier``;
* at ``threshold`` on the positive class (binary, or multiclass with a ``positive_class``):
  ``sensitivity``, ``specificity``, ``ppv``, ``npv``, ``f1``;
* ordinal: ``qwk`` (quadratic-weighted kappa), ``mae_grade``;
* multilabel: every binary metric per label (``sensitivity[<label>]`` …) and the macro mean
  under the bare name;
* regression: ``mae``, ``rmse``, ``r2``.

A metric that is undefined on the data (a class absent, no predicted positives) is NaN and the
reason is added to ``MetricDict.notes``; nothing raises for a degenerate sample.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm

from meddx.errors import EvaluationError
from meddx.tasks import TaskSpec

__all__ = [
    "MetricDict",
    "compute_metrics",
    "check_inputs",
    "binary_view",
    "metric_direction",
    "BINARY_THRESHOLD_METRICS",
]

logger = logging.getLogger(__name__)

#: Metrics computed at a threshold on the positive class.
BINARY_THRESHOLD_METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1")
_LOWER_IS_BETTER = ("brier", "mae_grade", "mae", "rmse", "ece")


class MetricDict(dict):
    """A ``dict[str, float]`` that also carries ``notes``: why a metric is NaN."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


def metric_direction(name: str) -> int:
    """+1 when higher is better, -1 when lower is (``brier``, ``mae_grade`` …)."""
    base = name.split("[", 1)[0]
    return -1 if base in _LOWER_IS_BETTER else 1


def check_inputs(task: TaskSpec, targets: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes and return ``(targets, probs)`` as arrays.

    Raises:
        EvaluationError: shapes that do not fit the task.
    """
    p = np.asarray(probs, dtype=float)
    if p.ndim == 1:
        p = p.reshape(-1, 1)
    t = np.asarray(targets, dtype=float)
    n = p.shape[0]
    if task.kind == "multilabel":
        t = t.reshape(n, -1) if t.size == n * task.num_classes else t
        expected_t: tuple[int, ...] = (n, task.num_classes)
    else:
        t = t.reshape(-1)
        expected_t = (n,)
    width = 1 if task.kind == "regression" else task.num_classes
    if p.shape != (n, width) or t.shape != expected_t:
        raise EvaluationError(
            f"predictions {p.shape} and targets {t.shape} do not fit the task "
            f"({task.describe()}; expected probabilities (N, {width}) and targets {expected_t})"
        )
    if task.kind in ("binary", "multiclass", "ordinal"):
        if np.isnan(t).any():
            raise EvaluationError(f"{task.kind} targets contain missing values")
        t = t.astype(int)
    return t, p


def binary_view(task: TaskSpec, targets: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(y, p)``: 0/1 positive-class truth and positive-class probability, or None.

    Defined for binary tasks and for multiclass/ordinal tasks with a ``positive_class``.
    """
    if task.kind == "binary":
        return np.asarray(targets).astype(int), probs[:, task.positive_index]
    if task.kind in ("multiclass", "ordinal") and task.positive_index is not None:
        pos = task.positive_index
        return (np.asarray(targets).astype(int) == pos).astype(int), probs[:, pos]
    return None


def _guard(out: MetricDict, key: str, fn: Callable[[], float], why: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            value = float(fn())
        except ValueError:
            value = float("nan")
    out[key] = value
    if not np.isfinite(value):
        out.note(f"{key}: {why}")


def _ranking(out: MetricDict, y: np.ndarray, p: np.ndarray, suffix: str) -> None:
    """AUROC and AUPRC of one 0/1 problem."""
    one_class = len(np.unique(y)) < 2
    why = "only one class present in the targets"
    if one_class:
        out[f"auroc{suffix}"] = out[f"auprc{suffix}"] = float("nan")
        out.note(f"auroc{suffix}: {why}")
        out.note(f"auprc{suffix}: {why}")
        return
    _guard(out, f"auroc{suffix}", lambda: skm.roc_auc_score(y, p), why)
    _guard(out, f"auprc{suffix}", lambda: skm.average_precision_score(y, p), why)


def _at_threshold(out: MetricDict, y: np.ndarray, p: np.ndarray, threshold: float,
                  suffix: str, with_accuracy: bool) -> None:
    """Sensitivity, specificity, PPV, NPV, F1 (and accuracies) of ``p >= threshold``."""
    pred = (p >= threshold).astype(int)
    nan = np.nan
    _guard(out, f"sensitivity{suffix}",
           lambda: skm.recall_score(y, pred, pos_label=1, zero_division=nan), "no positive cases")
    _guard(out, f"specificity{suffix}",
           lambda: skm.recall_score(y, pred, pos_label=0, zero_division=nan), "no negative cases")
    _guard(out, f"ppv{suffix}",
           lambda: skm.precision_score(y, pred, pos_label=1, zero_division=nan),
           "no case called positive at this threshold")
    _guard(out, f"npv{suffix}",
           lambda: skm.precision_score(y, pred, pos_label=0, zero_division=nan),
           "no case called negative at this threshold")
    _guard(out, f"f1{suffix}", lambda: skm.f1_score(y, pred, zero_division=nan),
           "no positive cases and none called positive")
    if with_accuracy:
        _guard(out, f"accuracy{suffix}", lambda: skm.accuracy_score(y, pred), "no cases")
        _guard(out, f"balanced_accuracy{suffix}",
               lambda: 0.5 * (out[f"sensitivity{suffix}"] + out[f"specificity{suffix}"]),
               "needs both classes")


def _binary(task: TaskSpec, t: np.ndarray, p: np.ndarray, threshold: float) -> MetricDict:
    out = MetricDict()
    y, pp = binary_view(task, t, p)  # type: ignore[misc]
    _ranking(out, y, pp, "")
    for k, name in enumerate(task.class_names):
        yk = y if k == task.positive_index else 1 - y
        _ranking(out, yk, p[:, k], f"[{name}]")
    _at_threshold(out, y, pp, threshold, "", with_accuracy=True)
    _guard(out, "brier", lambda: skm.brier_score_loss(y, pp, pos_label=1), "no cases")
    return out


def _multiclass(task: TaskSpec, t: np.ndarray, p: np.ndarray, threshold: float) -> MetricDict:
    out = MetricDict()
    labels = list(range(task.num_classes))
    for k, name in enumerate(task.class_names):
        _ranking(out, (t == k).astype(int), p[:, k], f"[{name}]")
    for key in ("auroc", "auprc"):
        per = np.array([out[f"{key}[{c}]"] for c in task.class_names])
        out[key] = float(np.nanmean(per)) if np.isfinite(per).any() else float("nan")
        if not np.isfinite(per).all():
            out.note(f"{key}: macro mean over the classes present only")
    pred = p.argmax(axis=1)
    _guard(out, "accuracy", lambda: skm.accuracy_score(t, pred), "no cases")
    _guard(out, "balanced_accuracy", lambda: _balanced_accuracy(t, pred, labels), "no cases")
    _guard(out, "brier", lambda: skm.brier_score_loss(t, p, labels=labels), "no cases")
    view = binary_view(task, t, p)
    if view is not None:
        _at_threshold(out, view[0], view[1], threshold, "", with_accuracy=False)
    if task.kind == "ordinal":
        _guard(out, "qwk", lambda: skm.cohen_kappa_score(t, pred, labels=labels,
                                                         weights="quadratic"),
               "agreement undefined (a single grade in truth and prediction)")
        _guard(out, "mae_grade", lambda: skm.mean_absolute_error(t, pred), "no cases")
    return out


def _balanced_accuracy(t: np.ndarray, pred: np.ndarray, labels: list[int]) -> float:
    # mean recall over the classes present in the truth (sklearn's definition), without its
    # warning for classes predicted but absent
    present = [k for k in labels if (t == k).any()]
    recalls = skm.recall_score(t, pred, labels=present, average=None, zero_division=np.nan)
    return float(np.mean(recalls))


def _multilabel(task: TaskSpec, t: np.ndarray, p: np.ndarray,
                threshold: float | Sequence[float]) -> MetricDict:
    out = MetricDict()
    thr = np.broadcast_to(np.asarray(threshold, dtype=float), (task.num_classes,))
    keys = ("auroc", "auprc", *BINARY_THRESHOLD_METRICS, "accuracy", "balanced_accuracy", "brier")
    for j, name in enumerate(task.class_names):
        known = ~np.isnan(t[:, j])
        y, pj, sfx = t[known, j].astype(int), p[known, j], f"[{name}]"
        if known.sum() == 0:
            for key in keys:
                out[f"{key}{sfx}"] = float("nan")
            out.note(f"{name}: no known labels")
            continue
        _ranking(out, y, pj, sfx)
        _at_threshold(out, y, pj, float(thr[j]), sfx, with_accuracy=True)
        _guard(out, f"brier{sfx}", lambda y=y, pj=pj: skm.brier_score_loss(y, pj, pos_label=1),
               "no cases")
    for key in keys:
        per = np.array([out[f"{key}[{c}]"] for c in task.class_names])
        out[key] = float(np.nanmean(per)) if np.isfinite(per).any() else float("nan")
    return out


def _regression(t: np.ndarray, p: np.ndarray) -> MetricDict:
    out = MetricDict()
    y, yhat = t.reshape(-1), p.reshape(-1)
    _guard(out, "mae", lambda: skm.mean_absolute_error(y, yhat), "no cases")
    _guard(out, "rmse", lambda: np.sqrt(skm.mean_squared_error(y, yhat)), "no cases")
    _guard(out, "r2", lambda: skm.r2_score(y, yhat) if len(y) > 1 else np.nan,
           "needs at least two cases")
    return out


def compute_metrics(
    task: TaskSpec,
    targets: Any,
    probs: Any,
    threshold: float | Sequence[float] | None = None,
) -> MetricDict:
    """Every metric that fits ``task``, as point estimates.

    Args:
        task: the label space.
        targets: encoded targets (see module docstring).
        probs: per-class probabilities (N, K) in ``class_names`` order (regression: (N,) values).
        threshold: decision threshold on the positive-class probability (binary, multiclass with
            a positive class; multilabel: one per label or one for all). Default 0.5.

    Returns:
        ``{metric: value}`` with ``notes`` explaining any NaN.

    Raises:
        EvaluationError: predictions and targets that do not fit the task.
    """
    t, p = check_inputs(task, targets, probs)
    if len(t) == 0:
        raise EvaluationError("no cases to evaluate")
    thr = 0.5 if threshold is None else threshold
    if task.kind == "binary":
        return _binary(task, t, p, float(thr))  # type: ignore[arg-type]
    if task.kind in ("multiclass", "ordinal"):
        return _multiclass(task, t, p, float(thr))  # type: ignore[arg-type]
    if task.kind == "multilabel":
        return _multilabel(task, t, p, thr)
    return _regression(t, p)
