"""The training reference a deployed model is monitored against, and the drift statistic.

:func:`training_reference` runs right after the post-hoc fits: it summarises, on the
calibration split, the distribution of the calibrated risk the model answers with and three
statistics of every model input tensor. The service logs the same statistics per request
(:func:`input_stats`) so that ``meddx monitor`` can compare the two with the population
stability index (:func:`psi`).

Input statistics are modality-independent and cheap (one pass over at most
:data:`MAX_ELEMENTS` values of the tensor the network receives): ``mean``, ``std`` and
``extreme`` — the fraction of values equal to the tensor's own minimum or maximum (saturated,
clipped or blank inputs raise it).

PSI = Σ (aᵢ − eᵢ) · ln(aᵢ / eᵢ) over the reference's quantile bins, with half a case added
to every bin on both sides so that an empty bin does not make it infinite. The usual reading:
below 0.1 stable, 0.1–0.25 a moderate shift, above 0.25 a major one. On small windows PSI is
biased upwards; :func:`psi_null_quantile` gives the value an unshifted window of that size
reaches by chance.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "INPUT_STATS",
    "MAX_ELEMENTS",
    "PSI_MODERATE",
    "PSI_MAJOR",
    "input_stats",
    "risk_scores",
    "risk_from_output",
    "histogram",
    "bin_counts",
    "psi",
    "psi_null_quantile",
    "training_reference",
]

logger = logging.getLogger(__name__)

INPUT_STATS = ("mean", "std", "extreme")
MAX_ELEMENTS = 262_144  # values looked at per input (a strided subsample beyond)
PSI_MODERATE = 0.1
PSI_MAJOR = 0.25
TOP_CLASS = "top-class"
_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def input_stats(x: Any) -> dict[str, float] | None:
    """``{"mean", "std", "extreme"}`` of a model input (tensor or array); None otherwise.

    Non-finite values are left out; ``extreme`` is the fraction of the remaining values equal
    to their minimum or maximum (1.0 for a constant input).
    """
    if hasattr(x, "detach") and hasattr(x, "numpy"):
        x = x.detach().cpu()
        if x.is_complex():
            return None
        a = x.reshape(-1).float().numpy()
    elif isinstance(x, np.ndarray) and x.dtype.kind in "fiub":
        a = x.reshape(-1).astype(np.float32, copy=False)
    else:
        return None
    if a.size > MAX_ELEMENTS:
        a = a[:: -(-a.size // MAX_ELEMENTS)]
    a = a[np.isfinite(a)]
    if a.size == 0:
        return None
    lo, hi = a.min(), a.max()
    extreme = float(np.count_nonzero((a == lo) | (a == hi))) / a.size if hi > lo else 1.0
    return {"mean": float(a.mean()), "std": float(a.std()), "extreme": extreme}


def risk_scores(task: Any, probs: np.ndarray) -> tuple[np.ndarray, str] | None:
    """The monitored risk per case: the positive class's probability, else the top class's.

    Returns ``(risk, risk_of)``, or None for regression tasks.
    """
    if task.kind == "regression":
        return None
    p = np.asarray(probs, dtype=float)
    if task.positive_class is not None:
        return p[:, task.class_names.index(task.positive_class)], task.positive_class
    return p.max(axis=1), TOP_CLASS


def risk_from_output(output: Mapping[str, Any], risk_of: str) -> float | None:
    """The risk in an audit line's output summary (calibrated probabilities when present)."""
    probs = output.get("calibrated") or output.get("probabilities")
    if not isinstance(probs, Mapping) or not probs:
        return None
    try:
        if risk_of == TOP_CLASS:
            return float(max(float(v) for v in probs.values()))
        value = probs.get(risk_of)
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _bins(edges: Sequence[float], values: np.ndarray) -> np.ndarray:
    """Bin index per value: the number of inner edges strictly below it."""
    return np.searchsorted(np.asarray(edges, dtype=float), values, side="left")


def bin_counts(edges: Sequence[float], values: Any) -> np.ndarray:
    """Counts of ``values`` in the ``len(edges) + 1`` bins (non-finite values dropped)."""
    v = np.asarray(values, dtype=float).reshape(-1)
    v = v[np.isfinite(v)]
    return np.bincount(_bins(edges, v), minlength=len(edges) + 1)


def histogram(values: Any, max_bins: int = 10) -> Any:
    """A :class:`~meddx.package.Histogram` of ``values`` with quantile bins (about five
    reference cases per bin at least, at most ``max_bins`` bins)."""
    from meddx.package import Histogram

    v = np.asarray(values, dtype=float).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("no finite values to summarise")
    n_bins = int(min(max_bins, max(2, v.size // 5)))
    edges = np.unique(np.quantile(v, np.linspace(0, 1, n_bins + 1)[1:-1]))
    counts = bin_counts(edges, v)
    return Histogram(edges=[float(e) for e in edges],
                     fractions=[float(c) / v.size for c in counts],
                     mean=float(v.mean()), std=float(v.std()),
                     quantiles={f"p{round(q * 100):02d}": float(np.quantile(v, q))
                                for q in _QUANTILES})


def _psi_from_counts(ref_counts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """PSI of count vectors (last axis = bins), half a case added to every bin."""
    k = counts.shape[-1]
    e = (ref_counts + 0.5) / (ref_counts.sum(axis=-1, keepdims=True) + 0.5 * k)
    a = (counts + 0.5) / (counts.sum(axis=-1, keepdims=True) + 0.5 * k)
    return np.sum((a - e) * np.log(a / e), axis=-1)


def psi(fractions: Sequence[float], n_ref: int, counts: Sequence[int]) -> float:
    """Population stability index of a window's bin ``counts`` against the reference
    ``fractions`` (measured on ``n_ref`` cases)."""
    ref = np.asarray(fractions, dtype=float) * n_ref
    c = np.asarray(counts, dtype=float)
    if c.sum() == 0:
        return float("nan")
    return float(_psi_from_counts(ref, c))


def psi_null_quantile(fractions: Sequence[float], n_ref: int, n: int, q: float = 0.95,
                      draws: int = 1000, seed: int = 0) -> float:
    """The ``q`` quantile of PSI between a reference of ``n_ref`` and a window of ``n`` cases
    both drawn from the reference distribution: the PSI that sampling noise alone reaches."""
    if n <= 0:
        return float("nan")
    f = np.asarray(fractions, dtype=float)
    f = f / f.sum()
    rng = np.random.default_rng(seed)
    ref = rng.multinomial(max(int(n_ref), 1), f, size=draws).astype(float)
    win = rng.multinomial(int(n), f, size=draws).astype(float)
    return float(np.quantile(_psi_from_counts(ref, win), q))


def _input_reference(package: Any, split: Any, max_inputs: int, seed: int) -> dict[str, Any]:
    """Per-input statistics of (a random subset of) ``split``, as the network receives them."""
    from meddx.modalities import get_modality

    modality = get_modality(package.card.modality)
    n = len(split)
    idx = np.arange(n)
    if n > max_inputs:
        idx = np.sort(np.random.default_rng(seed).choice(n, max_inputs, replace=False))
    rows = []
    for i in idx:
        stats = input_stats(modality.item_tensor(split.inputs[int(i)], package.card.preprocessing))
        if stats is None:
            return {}
        rows.append(stats)
    if not rows:
        return {}
    return {k: histogram([r[k] for r in rows]) for k in INPUT_STATS} | {"_n": len(rows)}


def training_reference(package: Any, split: Any, probs: np.ndarray, max_inputs: int = 2000,
                       seed: int = 0) -> dict[str, Any] | None:
    """The card's ``reference`` entry from the calibration split.

    Args:
        package: the trained :class:`~meddx.package.ModelPackage`.
        split: the calib split (its inputs are read again for the input statistics).
        probs: the calibrated per-class probabilities of ``split`` (as the Predictor gives).
        max_inputs: inputs read for the input statistics (a seeded random subset beyond).
        seed: seed of that subset.

    Returns:
        The entry as JSON-able dict (``TrainingReference``), or None (regression, no cases).
    """
    from meddx.package import TrainingReference

    scored = risk_scores(package.card.task, probs)
    if scored is None or len(scored[0]) == 0:
        return None
    risk, risk_of = scored
    try:
        inputs = _input_reference(package, split, max_inputs, seed)
    except Exception as e:  # noqa: BLE001 — input statistics are optional; the risk still counts
        logger.warning("input statistics for monitoring not computed: %s", e)
        inputs = {}
    n_inputs = int(inputs.pop("_n", 0))
    ref = TrainingReference(fitted_on=getattr(split, "name", "calib") or "calib", n=len(risk),
                            risk_of=risk_of, risk=histogram(risk), n_inputs=n_inputs,
                            inputs=inputs)
    return ref.model_dump(mode="json")
