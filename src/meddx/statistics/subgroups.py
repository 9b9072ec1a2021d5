"""Performance per subgroup (sex, age band, site …) with bootstrap intervals.

For every usable metadata column, the metrics are recomputed on each of its values, with a
95% bootstrap interval, the gap to the overall point estimate, a flag when the subgroup's whole
interval lies on the wrong side of the overall figure (below it for AUROC, above it for Brier),
and a warning when the subgroup is too small (cases or positives) for its interval to mean much.
Ages are grouped into bands (<30, 30-44, 45-59, 60-74, 75+); continuous columns other than age
and near-unique columns (identifiers) are left out with a note.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from meddx.statistics.bootstrap import bootstrap_metrics
from meddx.statistics.metrics import binary_view, check_inputs, metric_direction
from meddx.tasks import TaskSpec

__all__ = ["SubgroupResult", "subgroup_analysis", "age_bands", "default_subgroup_metrics",
           "AGE_BANDS"]

logger = logging.getLogger(__name__)

#: (low inclusive, high exclusive, label)
AGE_BANDS = ((None, 30, "<30"), (30, 45, "30-44"), (45, 60, "45-59"), (60, 75, "60-74"),
             (75, None, "75+"))
_MAX_LEVELS = 20


@dataclass
class SubgroupResult:
    """Rows of the subgroup table and what was left out.

    Each row: ``column``, ``group``, ``n``, ``positives`` (None without a positive class),
    ``metric``, ``value``, ``low``, ``high``, ``overall``, ``gap``, ``flag`` (interval wholly
    worse than overall), ``warning`` (text or None).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    split: str | None = None

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    @property
    def flagged(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["flag"]]


def default_subgroup_metrics(task: TaskSpec) -> list[str]:
    """The metrics shown per subgroup for a task."""
    if task.kind == "binary":
        return ["auroc", "sensitivity", "specificity", "accuracy"]
    if task.kind == "ordinal":
        return ["qwk", "accuracy", "auroc"]
    if task.kind == "multiclass":
        extra = ["sensitivity", "specificity"] if task.positive_class else ["balanced_accuracy"]
        return ["auroc", *extra, "accuracy"]
    if task.kind == "multilabel":
        return ["auroc", "auprc"]
    return ["mae", "rmse"]


def age_bands(values: pd.Series) -> pd.Series:
    """Age in years → band label (missing stays missing)."""
    age = pd.to_numeric(values, errors="coerce")
    out = pd.Series(pd.NA, index=values.index, dtype="object")
    for lo, hi, label in AGE_BANDS:
        m = age.notna()
        if lo is not None:
            m &= age >= lo
        if hi is not None:
            m &= age < hi
        out[m] = label
    return out


_MISSING = {"", "unknown", "nan", "na", "n/a", "none", "?", "missing"}


def _level(value: Any) -> str | None:
    """A category label, lower-cased; None for the usual spellings of "unknown"."""
    if value is None:
        return None
    text = str(value).strip().lower()
    return None if text in _MISSING else text


def _groupings(metadata: pd.DataFrame, notes: list[str]) -> dict[str, pd.Series]:
    """Column name → group label per case (NaN: not in any group)."""
    out: dict[str, pd.Series] = {}
    n = len(metadata)
    for col in metadata.columns:
        values = metadata[col]
        numeric = pd.to_numeric(values, errors="coerce")
        is_numeric = numeric.notna().sum() >= 0.8 * values.notna().sum() > 0
        if "age" in str(col).lower() and is_numeric:
            out["age band"] = age_bands(values)
            continue
        levels = values.dropna().map(_level).dropna().nunique()
        if is_numeric and levels > _MAX_LEVELS:
            notes.append(f"column '{col}' is continuous; not analysed")
        elif levels > _MAX_LEVELS or (n >= 20 and levels > 0.5 * n):
            notes.append(f"column '{col}' has {levels} values; not analysed")
        elif levels < 2:
            notes.append(f"column '{col}' has a single value; not analysed")
        else:
            out[str(col)] = values.where(values.notna(), None).map(_level)
    return out


def _band_order(labels: list[str]) -> list[str]:
    order = [b[2] for b in AGE_BANDS]
    return sorted(labels, key=lambda s: (order.index(s) if s in order else len(order), s))


def _warning(task: TaskSpec, t: np.ndarray, p: np.ndarray, min_n: int, min_pos: int) -> tuple[
        int | None, str | None]:
    n = len(t)
    view = binary_view(task, t, p)
    positives = None
    problems = []
    if n < min_n:
        problems.append(f"only {n} case{'s' if n != 1 else ''}")
    if view is not None:
        positives = int(view[0].sum())
        negatives = n - positives
        if positives < min_pos:
            problems.append(f"{positives} positive")
        if negatives < min_pos:
            problems.append(f"{negatives} negative")
    return positives, ("too small for a reliable interval: " + ", ".join(problems)
                       if problems else None)


def subgroup_analysis(
    task: TaskSpec,
    targets: Any,
    probs: Any,
    metadata: pd.DataFrame,
    threshold: float | Sequence[float] | None = None,
    patient_ids: Sequence[Any] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    metrics: Sequence[str] | None = None,
    min_n: int = 30,
    min_positives: int = 10,
    overall: dict[str, dict[str, float]] | None = None,
) -> SubgroupResult:
    """Metrics with CIs per value of every metadata column.

    Args:
        task, targets, probs, threshold, patient_ids, n_resamples, seed: as for
            :func:`~meddx.statistics.bootstrap.bootstrap_metrics`.
        metadata: one row per case.
        metrics: which metrics to tabulate (default :func:`default_subgroup_metrics`).
        min_n, min_positives: below these a subgroup gets a warning.
        overall: the overall results, if already computed.
    """
    t, p = check_inputs(task, targets, probs)
    result = SubgroupResult(metrics=list(metrics or default_subgroup_metrics(task)))
    if metadata is None or len(metadata.columns) == 0:
        result.notes.append("no metadata: subgroup analysis not possible")
        return result
    overall = overall or bootstrap_metrics(task, t, p, threshold, patient_ids, 0, seed)
    pids = np.asarray(patient_ids) if patient_ids is not None else None
    for col, groups in _groupings(metadata.reset_index(drop=True), result.notes).items():
        labels = [g for g in groups.dropna().unique()]
        missing = int(groups.isna().sum())
        if missing:
            result.notes.append(f"'{col}': {missing} case{'s' if missing != 1 else ''} "
                                "without a value left out")
        for label in _band_order([str(g) for g in labels]):
            idx = np.flatnonzero((groups == label).to_numpy())
            result.rows += _group_rows(task, t[idx], p[idx], col, label, threshold,
                                       None if pids is None else pids[idx], n_resamples,
                                       seed, result.metrics, overall, min_n, min_positives)
    return result


def _group_rows(task: TaskSpec, t: np.ndarray, p: np.ndarray, col: str, label: str,
                threshold: Any, pids: np.ndarray | None, n_resamples: int, seed: int,
                metrics: list[str], overall: dict, min_n: int, min_pos: int) -> list[dict]:
    positives, warning = _warning(task, t, p, min_n, min_pos)
    ci = bootstrap_metrics(task, t, p, threshold, None if pids is None else list(pids),
                           n_resamples, seed)
    rows = []
    for m in metrics:
        if m not in ci:
            continue
        v, o = ci[m], overall.get(m, {}).get("value", float("nan"))
        lo, hi = v["low"], v["high"]
        worse_side = hi < o if metric_direction(m) > 0 else lo > o
        rows.append({
            "column": col, "group": label, "n": int(len(t)), "positives": positives,
            "metric": m, "value": v["value"], "low": lo, "high": hi, "overall": o,
            "gap": v["value"] - o,
            "flag": bool(np.isfinite(lo) and np.isfinite(hi) and np.isfinite(o) and worse_side),
            "warning": warning,
        })
    return rows
