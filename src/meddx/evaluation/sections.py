"""The parts of an evaluation beyond discrimination: operating points, calibration, conformal
coverage and the cases the model got wrong. Pure array functions over one split."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from meddx.package import ModelCard
from meddx.statistics.alerts import alert_figures
from meddx.statistics.bootstrap import bootstrap_metrics
from meddx.statistics.calibration import calibration_error, reliability_curve
from meddx.statistics.conformal import prediction_sets
from meddx.statistics.metrics import binary_view, compute_metrics
from meddx.tasks import TaskSpec

__all__ = ["operating_point_section", "calibration_section", "conformal_section",
           "error_cases", "confusion_counts", "ood_section"]

_OP_METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1", "accuracy", "balanced_accuracy")


def confusion_counts(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, int]:
    """TP, FN, FP, TN of ``p >= threshold`` against 0/1 ``y``."""
    pred = p >= threshold
    y = y.astype(bool)
    return {"tp": int((y & pred).sum()), "fn": int((y & ~pred).sum()),
            "fp": int((~y & pred).sum()), "tn": int((~y & ~pred).sum())}


def operating_point_section(task: TaskSpec, card: ModelCard, targets: np.ndarray,
                            probs: np.ndarray, n_resamples: int, seed: int,
                            patient_ids: Sequence[Any] | None) -> dict[str, dict[str, Any]]:
    """For each operating point of the card: what its threshold does on this split, with CIs
    (sensitivity … balanced accuracy, ``min_sensitivity_ppv`` — Event 1 — and
    ``alerts_per_100``: the bedside trade-off between the points)."""
    view = binary_view(task, targets, probs)
    out: dict[str, dict[str, Any]] = {}
    if view is None:
        return out
    for name, op in card.operating_points.items():
        ci = bootstrap_metrics(task, targets, probs, op.threshold, patient_ids, n_resamples, seed)
        out[name] = {
            "method": op.method, "target": op.target, "threshold": op.threshold,
            "positive_class": op.positive_class, "fitted_on": op.fitted_on,
            "calib_sensitivity": op.calib_sensitivity, "calib_specificity": op.calib_specificity,
            "calib_ppv": op.calib_ppv,
            "default": name == card.default_operating_point,
            "metrics": {**{k: ci[k] for k in _OP_METRICS if k in ci},
                        **alert_figures(task, targets, probs, op.threshold, patient_ids,
                                        n_resamples, seed)},
            "confusion": confusion_counts(view[0], view[1], op.threshold),
        }
    return out


def _curve(task: TaskSpec, targets: np.ndarray, probs: np.ndarray) -> dict[str, list[float]]:
    if task.kind == "binary":
        return reliability_curve(task.target_index(targets), probs,
                                 positive_index=task.positive_index)
    if task.kind == "multilabel":
        t = np.asarray(targets, dtype=float).ravel()
        known = ~np.isnan(t)
        p = probs.ravel()[known]
        return reliability_curve(t[known].astype(int), np.column_stack([1 - p, p]),
                                 positive_index=1)
    return reliability_curve(task.target_index(targets), probs)


def calibration_section(task: TaskSpec, card: ModelCard, targets: np.ndarray,
                        raw: np.ndarray, calibrated: np.ndarray) -> dict[str, Any]:
    """ECE, Brier and reliability curves before and after temperature scaling."""
    if task.kind == "regression":
        return {}
    cal = card.calibration
    before, after = compute_metrics(task, targets, raw), compute_metrics(task, targets, calibrated)
    return {
        "method": None if cal is None else cal.method,
        "temperature": None if cal is None else cal.temperature,
        "fitted_on": None if cal is None else cal.fitted_on,
        "ece_kind": {"binary": "positive class", "multilabel": "per label, averaged"}.get(
            task.kind, "top-label confidence"),
        "ece_before": calibration_error(task, targets, raw),
        "ece_after": None if cal is None else calibration_error(task, targets, calibrated),
        "brier_before": before.get("brier"),
        "brier_after": None if cal is None else after.get("brier"),
        "curve_before": _curve(task, targets, raw),
        "curve_after": None if cal is None else _curve(task, targets, calibrated),
    }


def conformal_section(task: TaskSpec, card: ModelCard, targets: np.ndarray,
                      probs: np.ndarray) -> dict[str, Any]:
    """Empirical coverage and set sizes of the card's conformal sets on this split."""
    conf = card.conformal
    if conf is None or task.kind == "regression":
        return {}
    out: dict[str, Any] = {"method": conf.method, "alpha": conf.alpha,
                           "target_coverage": 1 - conf.alpha, "n_calib": conf.n_calib}
    if task.kind == "multilabel":
        t = np.asarray(targets, dtype=float)
        q = np.broadcast_to(np.asarray(conf.threshold, dtype=float), (probs.shape[1],))
        per, unsure = {}, {}
        for j, name in enumerate(task.class_names):
            both = np.column_stack([1 - probs[:, j], probs[:, j]])
            sets = prediction_sets(both, conf.method, float(q[j]))
            known = ~np.isnan(t[:, j])
            per[name] = float(sets[known][np.arange(known.sum()), t[known, j].astype(int)].mean()) \
                if known.any() else float("nan")
            unsure[name] = float((sets.sum(axis=1) != 1).mean())
        out.update(coverage=float(np.nanmean(list(per.values()))), per_class_coverage=per,
                   refer_rate=float(np.mean(list(unsure.values()))), per_label_refer=unsure,
                   mean_set_size=None)
        return out
    idx = task.target_index(targets)
    sets = prediction_sets(probs, conf.method, float(conf.threshold))  # type: ignore[arg-type]
    covered = sets[np.arange(len(idx)), idx]
    size = sets.sum(axis=1)
    out.update(
        coverage=float(covered.mean()),
        mean_set_size=float(size.mean()),
        singleton_rate=float((size == 1).mean()),
        refer_rate=float((size != 1).mean()),
        per_class_coverage={c: float(covered[idx == k].mean()) if (idx == k).any()
                            else float("nan") for k, c in enumerate(task.class_names)},
    )
    op = card.operating_point
    view = binary_view(task, targets, probs)
    if op is not None and view is not None:
        said = view[1] >= op.threshold
        single = size == 1
        only_pos = sets[:, task.class_names.index(op.positive_class)] & single
        out["review_rate"] = float((single & (said != only_pos)).mean())
    return out


def error_cases(task: TaskSpec, targets: np.ndarray, probs: np.ndarray, ids: Sequence[str],
                threshold: float | None, max_fn: int = 8, max_other: int = 4,
                ) -> list[dict[str, Any]]:
    """The cases to show in the error gallery: false negatives first (most confident misses),
    then false positives; without a positive class, the most confident misclassifications."""
    if task.kind in ("regression", "multilabel"):
        return _multilabel_misses(task, targets, probs, ids, max_fn) \
            if task.kind == "multilabel" else []
    names = task.class_names
    idx = task.target_index(targets)
    view = binary_view(task, targets, probs)
    out: list[dict[str, Any]] = []
    if view is not None:
        y, p = view
        thr = 0.5 if threshold is None else threshold
        pos = task.positive_index
        fn = np.flatnonzero((y == 1) & (p < thr))
        fp = np.flatnonzero((y == 0) & (p >= thr))
        for kind, chosen, explain in (("false negative", fn[np.argsort(p[fn])][:max_fn], pos),
                                      ("false positive", fp[np.argsort(-p[fp])][:max_other], pos)):
            for i in chosen:
                called = names[pos] if kind == "false positive" else f"not {names[pos]}"
                out.append({"index": int(i), "id": str(ids[i]), "kind": kind,
                            "truth": names[idx[i]], "called": called,
                            "probability": float(p[i]), "explain_class": int(explain)})
        return out
    pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(pred != idx)
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]])][: max_fn + max_other]
    return [{"index": int(i), "id": str(ids[i]), "kind": "misclassified",
             "truth": names[idx[i]], "called": names[pred[i]],
             "probability": float(probs[i, pred[i]]), "explain_class": int(idx[i])}
            for i in wrong]


def _multilabel_misses(task: TaskSpec, targets: np.ndarray, probs: np.ndarray,
                       ids: Sequence[str], limit: int) -> list[dict[str, Any]]:
    t = np.asarray(targets, dtype=float)
    miss = np.where(np.nan_to_num(t, nan=0.0) == 1, probs, np.inf)
    rows, cols = np.unravel_index(np.argsort(miss, axis=None)[:limit], miss.shape)
    return [{"index": int(i), "id": str(ids[i]), "kind": "false negative",
             "truth": task.class_names[j], "called": f"not {task.class_names[j]}",
             "probability": float(probs[i, j]), "explain_class": int(j)}
            for i, j in zip(rows, cols, strict=True) if np.isfinite(miss[i, j]) and
            probs[i, j] < 0.5]


def ood_section(card: ModelCard, scores: np.ndarray | None) -> dict[str, Any]:
    """The card's OOD detector against this split: the false-alarm rate it promised (with the
    95% range its ``n_threshold`` scores imply) and the share of the split it flagged, with a
    Clopper-Pearson 95% interval (every case of an evaluation split is in distribution)."""
    from scipy.stats import binomtest

    ood = card.ood
    if ood is None or scores is None or len(scores) == 0:
        return {}
    flagged = int(np.sum(np.asarray(scores) > ood.threshold))
    ci = binomtest(flagged, len(scores)).proportion_ci(confidence_level=0.95, method="exact")
    return {"method": ood.method, "target": ood.false_alarm,
            "threshold_fitted_on": ood.threshold_fitted_on, "n_threshold": ood.n_threshold
            or ood.n_calib, "expected_interval": ood.false_alarm_interval,
            "flagged": flagged, "n": len(scores), "rate": flagged / len(scores),
            "ci95": [float(ci.low), float(ci.high)]}
