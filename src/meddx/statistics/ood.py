"""Out-of-distribution scores: Mahalanobis distance on a network's features, and the energy score.

* **Mahalanobis** (Lee et al., NeurIPS 2018): class-conditional Gaussians with one shared
  covariance fitted on the penultimate features of the *training* split; the score of an input
  is its smallest squared Mahalanobis distance to a class mean. The covariance is the
  Ledoit-Wolf shrinkage estimate (a ResNet-18 has 512 features and BreastMNIST 546 training
  images: the sample covariance would be singular).
* **Energy** (Liu et al., NeurIPS 2020): ``-logsumexp(logits)``; used where a network has no
  linear head to take features from. A binary model's single logit ``z`` is read as the pair
  ``(0, z)``.

Both scores grow with "how unlike the training data": an input is flagged when its score is
above a threshold chosen on held-out in-distribution data (``calib``) for a stated false-alarm
rate (:func:`false_alarm_threshold`).
"""

from __future__ import annotations

import math

import numpy as np

from meddx.errors import EvaluationError

__all__ = ["MahalanobisScorer", "energy_score", "false_alarm_threshold", "detector_auroc"]


class MahalanobisScorer:
    """Class-conditional Gaussians with a shared (Ledoit-Wolf) covariance.

    scikit-learn manners: ``fit(features, classes)`` returns self; ``means_`` (K, D) and
    ``precision_`` (D, D) are the learned state; ``score(features)`` is the smallest squared
    distance to a class mean.
    """

    def fit(self, features: np.ndarray, classes: np.ndarray | None = None) -> MahalanobisScorer:
        from sklearn.covariance import LedoitWolf

        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or len(f) < 2:
            raise EvaluationError(f"need at least 2 feature vectors (N, D), got shape {f.shape}")
        c = np.zeros(len(f), dtype=int) if classes is None else np.asarray(classes).astype(int)
        labels = [k for k in np.unique(c) if (c == k).sum() >= 1]
        self.means_ = np.stack([f[c == k].mean(axis=0) for k in labels])
        centred = f - self.means_[np.searchsorted(labels, c)]
        lw = LedoitWolf(assume_centered=True).fit(centred)
        self.precision_ = np.asarray(lw.precision_, dtype=np.float64)
        self.shrinkage_ = float(lw.shrinkage_)
        return self

    @classmethod
    def from_arrays(cls, means: np.ndarray, precision: np.ndarray) -> MahalanobisScorer:
        """A fitted scorer from stored arrays (the package's ``ood.safetensors``)."""
        out = cls()
        out.means_ = np.asarray(means, dtype=np.float64)
        out.precision_ = np.asarray(precision, dtype=np.float64)
        return out

    def score(self, features: np.ndarray) -> np.ndarray:
        """Smallest squared Mahalanobis distance to a class mean, per row."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.precision_.shape[0]:
            raise EvaluationError(f"features of shape {f.shape} do not fit a detector of "
                                  f"dimension {self.precision_.shape[0]}")
        # (f-m)ᵀP(f-m) = fᵀPf - 2 fᵀPm + mᵀPm, for all classes at once
        fp = f @ self.precision_
        quad = np.einsum("nd,nd->n", fp, f)[:, None]
        cross = fp @ self.means_.T
        mpm = np.einsum("kd,kd->k", self.means_ @ self.precision_, self.means_)[None, :]
        return np.maximum(quad - 2 * cross + mpm, 0.0).min(axis=1)


def energy_score(logits: np.ndarray) -> np.ndarray:
    """``-logsumexp(logits)`` per row (higher: more unlike training); one logit z → (0, z)."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]
    if z.shape[1] == 1:
        z = np.concatenate([np.zeros_like(z), z], axis=1)
    top = z.max(axis=1)
    return -(top + np.log(np.exp(z - top[:, None]).sum(axis=1)))


def false_alarm_threshold(scores: np.ndarray, false_alarm: float) -> float:
    """The threshold that flags at most ``false_alarm`` of exchangeable in-distribution inputs.

    The ``ceil((n + 1)(1 - a)) / n`` empirical quantile of held-out scores (as a split-conformal
    threshold): a new in-distribution input scores above it with probability ≤ ``a``.

    Raises:
        EvaluationError: too few scores for the rate (n < 1/a - 1).
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    if not 0 < false_alarm < 1:
        raise EvaluationError(f"false-alarm rate must be in (0, 1), got {false_alarm}")
    k = math.ceil((n + 1) * (1 - false_alarm))
    if n == 0 or k > n:
        raise EvaluationError(f"{n} calibration cases are too few for a false-alarm rate of "
                              f"{false_alarm:g} (need at least {math.ceil(1 / false_alarm) - 1})")
    return float(s[k - 1])


def detector_auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """AUROC of telling ``out`` from ``in`` by the score (out is the positive class)."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(y, np.r_[in_scores, out_scores]))
