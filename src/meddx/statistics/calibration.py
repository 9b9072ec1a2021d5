"""Probability calibration: temperature scaling, expected calibration error, reliability curves.

Temperature scaling (Guo et al., 2017) divides the logits by one scalar T fitted on the
calibration split by minimising the task's own loss; it changes confidence, never the ranking.
"""

from __future__ import annotations

import numpy as np
import torch

from meddx.tasks import TaskSpec

__all__ = [
    "TemperatureScaler",
    "apply_temperature",
    "calibration_error",
    "expected_calibration_error",
    "reliability_curve",
    "calibration_intercept_slope",
    "calibration_transport",
]


def apply_temperature(task: TaskSpec, logits: np.ndarray, temperature: float) -> np.ndarray:
    """Per-class probabilities of ``logits / temperature``."""
    t = torch.as_tensor(np.asarray(logits, dtype=np.float32)) / float(temperature)
    return task.probabilities(t).numpy()


class TemperatureScaler:
    """Fit one temperature on held-out logits (scikit-learn manners: ``fit`` returns self).

    Args:
        task: the task whose loss is minimised.
        max_iter: L-BFGS iterations.
    """

    def __init__(self, task: TaskSpec, max_iter: int = 200) -> None:
        self.task = task
        self.max_iter = max_iter

    def fit(self, logits: np.ndarray, targets: np.ndarray) -> TemperatureScaler:
        z = torch.as_tensor(np.asarray(logits, dtype=np.float32))
        y = torch.as_tensor(np.asarray(targets))
        log_t = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=self.max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = self.task.loss(z / log_t.exp(), y)
            loss.backward()
            return loss

        opt.step(closure)
        t = float(log_t.exp().item())
        self.temperature_ = t if np.isfinite(t) and 0.01 < t < 100 else 1.0
        return self

    def transform(self, logits: np.ndarray) -> np.ndarray:
        return apply_temperature(self.task, logits, self.temperature_)


def _binned(y_index: np.ndarray, probs: np.ndarray, n_bins: int, positive_index: int | None
            ) -> list[tuple[float, float, int]]:
    """(mean confidence, observed frequency, count) per non-empty equal-width bin.

    With ``positive_index``: the positive-class probability against the positive rate (binary
    tasks: the probability clinicians read); otherwise top-label confidence against accuracy.
    """
    probs = np.asarray(probs, dtype=float)
    y_index = np.asarray(y_index).astype(int)
    if positive_index is not None:
        conf = probs[:, positive_index]
        hit = (y_index == positive_index).astype(float)
    else:
        conf = probs.max(axis=1)
        hit = (probs.argmax(axis=1) == y_index).astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    return [(float(conf[bins == b].mean()), float(hit[bins == b].mean()), int((bins == b).sum()))
            for b in range(n_bins) if (bins == b).any()]


def expected_calibration_error(
    y_index: np.ndarray, probs: np.ndarray, n_bins: int = 15, positive_index: int | None = None
) -> float:
    """ECE with equal-width bins (see :func:`_binned` for what is compared)."""
    rows = _binned(y_index, probs, n_bins, positive_index)
    n = sum(c for _, _, c in rows)
    return float(sum(c / n * abs(conf - obs) for conf, obs, c in rows)) if n else 0.0


def reliability_curve(
    y_index: np.ndarray, probs: np.ndarray, n_bins: int = 10, positive_index: int | None = None
) -> dict[str, list[float]]:
    """Mean predicted probability, observed frequency and count per bin (for the diagram)."""
    rows = _binned(y_index, probs, n_bins, positive_index)
    return {"predicted": [r[0] for r in rows], "observed": [r[1] for r in rows],
            "count": [r[2] for r in rows]}


def calibration_error(task: TaskSpec, targets: np.ndarray, probs: np.ndarray) -> float:
    """ECE: of the positive class (binary), per label averaged (multilabel), else top-label."""
    if task.kind == "binary":
        return expected_calibration_error(task.target_index(targets), probs,
                                          positive_index=task.positive_index)
    if task.kind == "multilabel":
        t = np.asarray(targets, dtype=float)
        eces = []
        for j in range(probs.shape[1]):
            known = ~np.isnan(t[:, j])
            if known.any():
                pj = np.column_stack([1 - probs[known, j], probs[known, j]])
                eces.append(expected_calibration_error(t[known, j].astype(int), pj,
                                                       positive_index=1))
        return float(np.mean(eces)) if eces else float("nan")
    return expected_calibration_error(task.target_index(targets), probs)


# ------------------------------------------------------------ transport (external validation)
def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def _fit_logistic(y: np.ndarray, x: np.ndarray, w: np.ndarray, slope: bool,
                  iters: int = 50) -> tuple[float, float]:
    """Weighted logistic recalibration ``logit P(y) = a + b·x`` by Newton's method;
    ``slope=False`` fixes b = 1 (x is an offset). Returns (a, b)."""
    a, b = 0.0, 1.0
    for _ in range(iters):
        eta = a + b * x
        mu = 1 / (1 + np.exp(-eta))
        r, v = w * (y - mu), w * mu * (1 - mu) + 1e-12
        if slope:
            g = np.array([r.sum(), (r * x).sum()])
            h = np.array([[v.sum(), (v * x).sum()], [(v * x).sum(), (v * x * x).sum()]])
            step = np.linalg.solve(h + 1e-9 * np.eye(2), g)
            a, b = a + step[0], b + step[1]
        else:
            step = r.sum() / v.sum()
            a += step
            step = np.array([step])
        if np.max(np.abs(step)) < 1e-8:
            break
    return float(a), float(b)


def calibration_intercept_slope(y: np.ndarray, p: np.ndarray,
                                weights: np.ndarray | None = None) -> dict[str, float]:
    """Calibration-in-the-large and calibration slope of probabilities ``p`` for 0/1 ``y``.

    * ``intercept``: ``a`` of ``logit P(y=1) = a + logit(p)`` (slope fixed at 1): 0 when the
      mean risk is right, > 0 when the model under-predicts;
    * ``slope``: ``b`` of ``logit P(y=1) = a + b·logit(p)``: 1 when well calibrated, < 1 when
      the predictions are too extreme (over-confident; the usual sign of overfitting or of
      transport to other data), > 1 when too modest;
    * ``observed_minus_expected``: mean of y minus mean of p.
    """
    y = np.asarray(y, dtype=np.float64)
    x = _logit(p)
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=np.float64)
    a0, _ = _fit_logistic(y, x, w, slope=False)
    _, b = _fit_logistic(y, x, w, slope=True)
    return {"intercept": a0, "slope": b,
            "observed_minus_expected": float((w * (y - np.asarray(p))).sum() / w.sum())}


def calibration_transport(y: np.ndarray, p: np.ndarray, n_resamples: int = 1000,
                          seed: int = 0) -> dict[str, dict[str, float]]:
    """:func:`calibration_intercept_slope` with 95% percentile bootstrap intervals
    (resampling cases within each outcome class, as the other intervals of a report)."""
    y = np.asarray(y).astype(int)
    point = calibration_intercept_slope(y, p)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in point}
    groups = [np.flatnonzero(y == k) for k in (0, 1)]
    for _ in range(n_resamples):
        w = np.zeros(len(y))
        for g in groups:
            if len(g):
                np.add.at(w, rng.choice(g, len(g)), 1.0)
        for k, v in calibration_intercept_slope(y, p, w).items():
            draws[k].append(v)
    out = {}
    for k, v in point.items():
        lo, hi = (np.percentile(draws[k], [2.5, 97.5]) if n_resamples else (np.nan, np.nan))
        out[k] = {"value": v, "low": float(lo), "high": float(hi)}
    return out
