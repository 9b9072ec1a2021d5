"""Operating points: the decision threshold on the positive-class probability.

Chosen on the calibration split only (never val or test), with scikit-learn manners:
``ThresholdSelector(method="sensitivity", target=0.95).fit(y, p)`` stores ``threshold_``.
A case is called positive when ``p >= threshold_``.

* ``sensitivity``: the highest threshold whose sensitivity reaches ``target`` (a screening
  test must not miss disease; among such thresholds the most specific one);
* ``specificity``: the lowest threshold whose specificity reaches ``target``;
* ``youden``: the threshold maximising sensitivity + specificity - 1;
* ``balanced``: the threshold where sensitivity equals positive predictive value (PPV).

The balanced point, precisely: flagging the ``k`` highest-risk calibration cases gives
sensitivity ``TP_k / P`` and PPV ``TP_k / k`` (``P`` positive cases), which are equal exactly
when ``k = P`` — as many alerts as there are positive cases — whatever the ranking. The
threshold is therefore the ``P``-th highest probability. Where tied probabilities straddle
that cut (a whole tie is flagged or not), the cut moves to the score boundary with the
smallest ``|sensitivity - PPV|``; remaining ties go to the larger ``min(sensitivity, PPV)``,
then to the higher threshold (fewer alerts). ``min(sensitivity, PPV)`` is the PhysioNet/CinC
2012 Event 1 score: for every ``k < P`` it is ``TP_k / P <= TP_P / P``, so the balanced point
scores Event 1 at least as high as any threshold that raises fewer alerts. A threshold that
raises more can score higher on calib only where the extra cases happen to be mostly
positive; chasing that (the arg-max of Event 1) fits the noise of a few hundred cases
(see ``docs/evaluation.md``).
"""

from __future__ import annotations

import logging

import numpy as np
from sklearn.metrics import roc_curve

from meddx.errors import EvaluationError
from meddx.package import OperatingPoint

__all__ = ["ThresholdSelector", "operating_point_name", "balanced_threshold", "METHODS",
           "UNTARGETED"]

logger = logging.getLogger(__name__)

METHODS = ("sensitivity", "specificity", "youden", "balanced")
#: methods that take no target
UNTARGETED = ("youden", "balanced")


def operating_point_name(method: str, target: float | None) -> str:
    """Key of an operating point in the card: ``sensitivity@0.95``, ``youden``."""
    return method if method in UNTARGETED or target is None else f"{method}@{target:g}"


class ThresholdSelector:
    """Pick a threshold on calibration data.

    Args:
        method: ``sensitivity``, ``specificity``, ``youden`` or ``balanced``.
        target: the sensitivity or specificity to reach (ignored by ``youden`` and
            ``balanced``).
        positive_class: name of the positive class (for :meth:`to_card`).
    """

    def __init__(self, method: str = "sensitivity", target: float = 0.95,
                 positive_class: str | None = None) -> None:
        if method not in METHODS:
            raise EvaluationError(f"unknown operating point method {method!r}",
                                  hint=f"choose one of {', '.join(METHODS)}")
        if method not in UNTARGETED and not 0 < target < 1:
            raise EvaluationError(f"operating point target must be in (0, 1), got {target}")
        self.method = method
        self.target = target
        self.positive_class = positive_class

    def fit(self, y: np.ndarray, p_positive: np.ndarray) -> ThresholdSelector:
        """Choose ``threshold_`` from 0/1 truth ``y`` and positive-class probabilities.

        Raises:
            EvaluationError: the calibration data lack positive or negative cases.
        """
        y = np.asarray(y).astype(int).reshape(-1)
        p = np.asarray(p_positive, dtype=float).reshape(-1)
        n_pos, n_neg = int(y.sum()), int((1 - y).sum())
        if n_pos == 0 or n_neg == 0:
            raise EvaluationError(
                f"cannot choose an operating point: the calibration split has {n_pos} positive "
                f"and {n_neg} negative cases",
                hint="use a larger data.calib_fraction",
            )
        if self.method == "balanced":
            self.threshold_ = balanced_threshold(y, p)
            return self._finish(y, p, n_pos)
        fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
        if self.method == "sensitivity":
            i = int(np.argmax(tpr >= self.target - 1e-12))
        elif self.method == "specificity":
            i = int(np.flatnonzero(1 - fpr >= self.target - 1e-12).max())
        else:
            i = int(np.argmax(tpr - fpr))
        # roc_curve's first threshold is +inf (nobody positive); keep the card finite
        self.threshold_ = float(min(thresholds[i], 1.0)) if i > 0 else 1.0 + 1e-9
        return self._finish(y, p, n_pos)

    def _finish(self, y: np.ndarray, p: np.ndarray, n_pos: int) -> ThresholdSelector:
        pred = p >= self.threshold_
        self.calib_sensitivity_ = float(pred[y == 1].mean())
        self.calib_specificity_ = float((~pred[y == 0]).mean())
        self.calib_ppv_ = float(y[pred].mean()) if pred.any() else 0.0
        self.n_calib_ = int(len(y))
        logger.debug("%s: threshold %.4f on %d cases (%d positive)", self.name, self.threshold_,
                     self.n_calib_, n_pos)
        return self

    @property
    def name(self) -> str:
        return operating_point_name(self.method,
                                    None if self.method in UNTARGETED else self.target)

    def predict(self, p_positive: np.ndarray) -> np.ndarray:
        """1 where the case is called positive."""
        return (np.asarray(p_positive, dtype=float) >= self.threshold_).astype(int)

    def to_card(self, positive_class: str | None = None) -> OperatingPoint:
        """The fitted operating point as the model card stores it."""
        name = positive_class or self.positive_class
        if name is None:
            raise EvaluationError("to_card needs the positive class name")
        if not hasattr(self, "threshold_"):
            raise EvaluationError("ThresholdSelector is not fitted")
        return OperatingPoint(
            method=self.method,
            threshold=self.threshold_,
            positive_class=name,
            target=None if self.method in UNTARGETED else self.target,
            fitted_on="calib",
            calib_sensitivity=self.calib_sensitivity_,
            calib_specificity=self.calib_specificity_,
            calib_ppv=self.calib_ppv_,
        )


def balanced_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold where sensitivity equals PPV on ``y``/``p`` (see the module docstring).

    Args:
        y: 0/1 truth (at least one positive).
        p: positive-class probabilities.

    Returns:
        A threshold ``t``: cases with ``p >= t`` are flagged (at least one case is).
    """
    y = np.asarray(y).astype(int).reshape(-1)
    p = np.asarray(p, dtype=float).reshape(-1)
    n_pos = int(y.sum())
    order = np.argsort(-p, kind="stable")
    s, t = p[order], y[order]
    tp = np.cumsum(t)
    k = np.arange(1, len(s) + 1)
    # a cut can only fall between distinct scores: the whole tie is flagged or none of it
    boundary = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    se, ppv = tp[boundary] / n_pos, tp[boundary] / k[boundary]
    gap, low = np.abs(se - ppv), np.minimum(se, ppv)
    # lexsort: last key first — smallest gap, then largest min(Se, PPV), then highest threshold
    best = np.lexsort((-s[boundary], -low, np.round(gap, 12)))[0]
    return float(s[boundary[best]])
