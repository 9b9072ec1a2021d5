"""Percentile bootstrap confidence intervals for every metric, stratified and by patient.

Each resample draws, within every class stratum, as many units as the stratum holds, with
replacement; a unit is a case, or a patient when patient ids are given (cluster bootstrap: all
of a patient's cases enter or leave together, so correlated images of one patient do not
narrow the interval). All resamples are evaluated at once as a weight matrix
(:mod:`meddx.statistics.weighted`), in blocks that bound memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from meddx.errors import EvaluationError
from meddx.statistics.metrics import MetricDict, check_inputs, compute_metrics
from meddx.statistics.weighted import weighted_metrics
from meddx.tasks import TaskSpec

__all__ = ["bootstrap_metrics", "resample_weights", "bootstrap_distribution"]

logger = logging.getLogger(__name__)

_BLOCK_CELLS = 4_000_000  # weights held at once (B × N), ~32 MB of float64


def _units_and_strata(task: TaskSpec, targets: np.ndarray,
                      patient_ids: Sequence[Any] | None) -> tuple[np.ndarray, np.ndarray]:
    """Unit index per case and the stratum of every unit."""
    n = len(targets)
    if patient_ids is not None:
        if len(patient_ids) != n:
            raise EvaluationError(f"{len(patient_ids)} patient ids for {n} cases")
        _, unit = np.unique(np.asarray([str(p) for p in patient_ids]), return_inverse=True)
    else:
        unit = np.arange(n)
    n_units = int(unit.max()) + 1 if n else 0
    if task.kind in ("binary", "multiclass", "ordinal"):
        label = np.asarray(targets).astype(int).reshape(-1)
    elif task.kind == "multilabel":
        # stratify on "any positive label" so rare positives are kept in every resample
        label = (np.nan_to_num(np.asarray(targets, dtype=float)) > 0).any(axis=1).astype(int)
    else:
        label = np.zeros(n, dtype=int)
    stratum = np.zeros(n_units, dtype=int)
    np.maximum.at(stratum, unit, label)  # a patient with any positive case is a positive unit
    return unit, stratum


def resample_weights(unit: np.ndarray, stratum: np.ndarray, n_resamples: int,
                     rng: np.random.Generator) -> np.ndarray:
    """(B, N) multiplicities of each case in ``n_resamples`` stratified (cluster) resamples."""
    n_units = len(stratum)
    counts = np.zeros((n_resamples, n_units))
    rows = np.arange(n_resamples)[:, None] * n_units
    for s in np.unique(stratum):
        members = np.flatnonzero(stratum == s)
        draws = members[rng.integers(0, len(members), size=(n_resamples, len(members)))]
        counts += np.bincount((draws + rows).ravel(), minlength=n_resamples * n_units).reshape(
            n_resamples, n_units
        )
    return counts[:, unit]


def bootstrap_distribution(
    task: TaskSpec,
    targets: Any,
    probs: Any,
    threshold: float | Sequence[float] | None = None,
    patient_ids: Sequence[Any] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Every metric under ``n_resamples`` resamples: ``{metric: array (B,)}``."""
    t, p = check_inputs(task, targets, probs)
    unit, stratum = _units_and_strata(task, t, patient_ids)
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_CELLS // max(len(t), 1))
    parts: list[dict[str, np.ndarray]] = []
    done = 0
    while done < n_resamples:
        b = min(block, n_resamples - done)
        W = resample_weights(unit, stratum, b, rng)
        parts.append(weighted_metrics(task, t, p, W, threshold))
        done += b
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


def bootstrap_metrics(
    task: TaskSpec,
    targets: Any,
    probs: Any,
    threshold: float | Sequence[float] | None = None,
    patient_ids: Sequence[Any] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, dict[str, float]]:
    """Point estimates (scikit-learn) with percentile bootstrap confidence intervals.

    Args:
        task: the label space.
        targets: encoded targets.
        probs: per-class probabilities (N, K).
        threshold: decision threshold on the positive class (see ``compute_metrics``).
        patient_ids: one per case; when given, patients are resampled (cluster bootstrap).
        n_resamples: bootstrap resamples (0: point estimates only, intervals NaN).
        seed: seed of the resampling.
        confidence: coverage of the interval.

    Returns:
        ``{metric: {"value", "low", "high"}}``; the returned dict (a :class:`MetricDict`)
        carries ``notes`` on undefined metrics and intervals.
    """
    point = compute_metrics(task, targets, probs, threshold)
    out = MetricDict()
    out.notes = list(point.notes)
    if n_resamples <= 0:
        for k, v in point.items():
            out[k] = {"value": v, "low": float("nan"), "high": float("nan")}
        return out
    dist = bootstrap_distribution(task, targets, probs, threshold, patient_ids, n_resamples, seed)
    lo_q, hi_q = 50 * (1 - confidence), 100 - 50 * (1 - confidence)
    for key, value in point.items():
        samples = dist.get(key)
        low = high = float("nan")
        if samples is not None and np.isfinite(value):
            finite = samples[np.isfinite(samples)]
            if finite.size >= 0.9 * samples.size and finite.size > 1:
                low, high = (float(x) for x in np.percentile(finite, [lo_q, hi_q]))
            else:
                out.note(f"{key}: interval not given, undefined in "
                         f"{samples.size - finite.size} of {samples.size} resamples")
        out[key] = {"value": float(value), "low": low, "high": high}
    return out
