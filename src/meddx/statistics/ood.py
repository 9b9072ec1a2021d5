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
rate (:func:`false_alarm_threshold`). The rate is promised on average over calibration draws;
with ``n`` scores the realised rate of one detector follows a Beta distribution
(:func:`false_alarm_distribution`), wide for small ``n``. :func:`crossfit_scores` gives more
held-out Mahalanobis scores: the training split's own, each from Gaussians fitted without it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from meddx.errors import EvaluationError

__all__ = ["MahalanobisScorer", "energy_score", "false_alarm_threshold", "detector_auroc",
           "crossfit_scores", "false_alarm_distribution", "pool_scores", "SHIFT_P"]

# below this two-sided Mann-Whitney p, out-of-fold train scores are taken to differ from calib's
# (not exchangeable with new inputs) and "auto" leaves them out of the threshold
SHIFT_P = 0.05


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


def false_alarm_distribution(n: int, false_alarm: float, level: float = 0.95) -> dict[str, float]:
    """What the realised false-alarm rate of a threshold from ``n`` exchangeable scores is.

    The threshold is the ``k = ceil((n+1)(1-a))``-th smallest score; the share of new
    in-distribution inputs above it is ``Beta(n+1-k, k)`` over calibration draws (Vovk 2012;
    Angelopoulos & Bates 2021, section 3.2): mean ``(n+1-k)/(n+1) <= a``, spread ~ 1/sqrt(n).

    Returns:
        ``expected`` (the mean) and ``low``/``high``, the central ``level`` interval.

    Raises:
        EvaluationError: too few scores for the rate (as :func:`false_alarm_threshold`).
    """
    from scipy.stats import beta

    k = math.ceil((n + 1) * (1 - false_alarm))
    if not 0 < false_alarm < 1 or n < 1 or k > n:
        raise EvaluationError(f"no false-alarm distribution for n={n}, rate {false_alarm:g}")
    a, b = n + 1 - k, k
    tail = (1 - level) / 2
    return {"expected": a / (n + 1), "low": float(beta.ppf(tail, a, b)),
            "high": float(beta.ppf(1 - tail, a, b))}


def _fold_ids(n: int, classes: np.ndarray | None, groups: np.ndarray | None, folds: int,
              seed: int) -> np.ndarray:
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    stratify = classes is not None and np.unique(classes, return_counts=True)[1].min() >= folds
    if groups is not None and len(np.unique(groups)) < folds:
        raise EvaluationError(f"{len(np.unique(groups))} patients are too few for {folds} "
                              "cross-fitting folds", hint="lower evaluation.ood_folds")
    if groups is not None:
        splitter: Any = (StratifiedGroupKFold(folds, shuffle=True, random_state=seed) if stratify
                         else GroupKFold(folds))
    else:
        splitter = (StratifiedKFold(folds, shuffle=True, random_state=seed) if stratify
                    else KFold(folds, shuffle=True, random_state=seed))
    fold = np.full(n, -1, dtype=int)
    y = classes if stratify else np.zeros(n, dtype=int)
    for k, (_, held) in enumerate(splitter.split(np.zeros(n), y, groups)):
        fold[held] = k
    return fold


def crossfit_scores(features: np.ndarray, classes: np.ndarray | None = None, folds: int = 5,
                    seed: int = 0, groups: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold Mahalanobis scores of the rows of ``features``.

    The rows are cut into ``folds`` folds (stratified by class where every class fills each
    fold; whole patients per fold where ``groups`` are given); each fold is scored by a
    :class:`MahalanobisScorer` fitted on the other folds, so no score comes from Gaussians that
    saw its own row (an in-sample score is optimistically small: the row pulls the mean and the
    covariance towards itself).

    Returns:
        ``(scores, fold)``: one score and the index of its held-out fold per row.

    Raises:
        EvaluationError: ``folds`` < 2, or too few rows (or patients) for the folds.
    """
    f = np.asarray(features, dtype=np.float64)
    if folds < 2 or len(f) < 2 * folds:
        raise EvaluationError(f"{len(f)} feature vectors are too few for {folds} "
                              "cross-fitting folds (need folds >= 2 and 2 rows per fold)",
                              hint="lower evaluation.ood_folds or set "
                                   "evaluation.ood_threshold_scores: calib")
    c = None if classes is None else np.asarray(classes).astype(int)
    g = None if groups is None else np.asarray(groups)
    fold = _fold_ids(len(f), c, g, folds, seed)
    scores = np.empty(len(f), dtype=np.float64)
    for k in range(folds):
        held = fold == k
        scorer = MahalanobisScorer().fit(f[~held], None if c is None else c[~held])
        scores[held] = scorer.score(f[held])
    return scores, fold


def pool_scores(calib: np.ndarray, oof: np.ndarray | None, mode: str = "auto",
                min_p: float = SHIFT_P) -> tuple[np.ndarray, str, float | None]:
    """The scores a threshold is chosen on: ``calib``, or ``calib`` + out-of-fold ``oof``.

    ``mode`` "calib": calib alone; "crossfit": both, always; "auto": both unless a two-sided
    Mann-Whitney test says the two differ (p < ``min_p``): out-of-fold train scores come from
    a network that trained on those cases, and one that memorised them puts them nearer the
    class means than new inputs (a pooled threshold would then be too low). Calib alone is
    valid either way; pooling only narrows the spread of the realised rate.

    Returns:
        ``(scores, used, p)``: the pool, "calib" or "crossfit", and the test's p (or None).
    """
    from scipy.stats import mannwhitneyu

    calib = np.asarray(calib, dtype=np.float64)
    if mode == "calib" or oof is None or len(oof) == 0:
        return calib, "calib", None
    p = float(mannwhitneyu(calib, oof).pvalue)
    if mode == "auto" and p < min_p:
        return calib, "calib", p
    return np.r_[calib, np.asarray(oof, dtype=np.float64)], "crossfit", p


def detector_auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """AUROC of telling ``out`` from ``in`` by the score (out is the positive class)."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(y, np.r_[in_scores, out_scores]))
