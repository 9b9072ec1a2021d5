"""Split-conformal prediction sets (LAC and APS), fitted on the calibration split.

LAC (least ambiguous classifier, Sadinle et al. 2019): score ``1 - p_y``; the set holds every
class with ``1 - p_k <= q̂``. APS (adaptive prediction sets, Romano et al. 2020, non-randomised):
score = probability mass of the classes ranked strictly above the true class (Romano's
randomised score with U = 0); the set takes classes in descending order while the mass above
them is at most q̂. Score and set use the same rule, so coverage is 1-α, not the ~0.99 of
mixing an inclusive score with an exclusive set; the top class is always in the set. q̂ is the
``ceil((n+1)(1-α))/n`` empirical quantile of the calibration scores, which guarantees coverage
≥ 1-α on exchangeable data. Multilabel tasks get one binary conformal problem per label.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ConformalClassifier", "conformal_quantile", "prediction_sets"]


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The finite-sample-corrected (1-α) quantile of calibration scores."""
    scores = np.sort(np.asarray(scores, dtype=float))
    n = scores.size
    if n == 0:
        return 1.0
    k = int(np.ceil((n + 1) * (1 - alpha)))
    if k > n:
        return float("inf")
    return float(scores[k - 1])


def _scores(method: str, probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    p_true = probs[np.arange(len(y)), y]
    if method == "lac":
        return 1.0 - p_true
    # APS (U = 0): mass of the classes more probable than the true class
    return np.where(probs > p_true[:, None], probs, 0.0).sum(axis=1)


def prediction_sets(probs: np.ndarray, method: str, threshold: float) -> np.ndarray:
    """Boolean (N, K) membership of each class in each sample's set."""
    probs = np.asarray(probs, dtype=float)
    if method == "lac":
        return (1.0 - probs) <= threshold + 1e-12
    order = np.argsort(-probs, axis=1)
    sorted_p = np.take_along_axis(probs, order, axis=1)
    mass_above = np.cumsum(sorted_p, axis=1) - sorted_p
    keep_sorted = mass_above <= threshold + 1e-12
    keep_sorted[:, 0] = True  # never an empty set under APS
    out = np.zeros_like(keep_sorted)
    np.put_along_axis(out, order, keep_sorted, axis=1)
    return out


class ConformalClassifier:
    """Fit q̂ on calibration probabilities (scikit-learn manners).

    Args:
        method: "lac" or "aps".
        alpha: target miscoverage (sets contain the truth with probability ≥ 1-α).
        multilabel: treat each column as its own binary problem.
    """

    def __init__(self, method: str = "lac", alpha: float = 0.1, multilabel: bool = False) -> None:
        if method not in ("lac", "aps"):
            raise ValueError(f"unknown conformal method {method!r}")
        self.method = method
        self.alpha = alpha
        self.multilabel = multilabel

    def fit(self, probs: np.ndarray, y: np.ndarray) -> ConformalClassifier:
        probs = np.asarray(probs, dtype=float)
        if self.multilabel:
            y = np.asarray(y, dtype=float)
            q = []
            for j in range(probs.shape[1]):
                known = ~np.isnan(y[:, j])
                pj = np.stack([1 - probs[known, j], probs[known, j]], axis=1)
                yj = y[known, j].astype(int)
                q.append(conformal_quantile(_scores(self.method, pj, yj), self.alpha))
            self.threshold_: float | list[float] = q
        else:
            y = np.asarray(y).astype(int)
            self.threshold_ = conformal_quantile(_scores(self.method, probs, y), self.alpha)
        self.n_calib_ = int(len(probs))
        return self

    def predict_sets(self, probs: np.ndarray) -> np.ndarray:
        """(N, K) for single-label tasks; (N, L, 2) [absent, present] for multilabel."""
        probs = np.asarray(probs, dtype=float)
        if self.multilabel:
            q = np.asarray(self.threshold_, dtype=float)
            both = np.stack([1 - probs, probs], axis=2)
            return np.stack(
                [prediction_sets(both[:, j], self.method, q[j]) for j in range(probs.shape[1])],
                axis=1,
            )
        return prediction_sets(probs, self.method, float(self.threshold_))
