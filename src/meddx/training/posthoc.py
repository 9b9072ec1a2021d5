"""Post-hoc fits on the calibration split: temperature, operating points, conformal threshold,
and the out-of-distribution detector's threshold (:mod:`meddx.training.ood`).

:func:`fit_post_hoc` is what the trainer calls right after training; everything is fitted on
``calib`` (carved from train, never val or test) and written into the package's card. The
operating points and the conformal sets act on the *calibrated* probabilities, as the
Predictor applies them.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from meddx.config import EvaluationConfig
from meddx.errors import EvaluationError
from meddx.package import Calibration, Conformal, ModelCard, ModelPackage
from meddx.statistics.calibration import (
    TemperatureScaler,
    apply_temperature,
    calibration_error,
)
from meddx.statistics.conformal import ConformalClassifier
from meddx.statistics.metrics import binary_view, compute_metrics
from meddx.statistics.operating_points import ThresholdSelector, operating_point_name
from meddx.tasks import TaskSpec
from meddx.training.reference import training_reference

__all__ = ["fit_post_hoc", "split_logits", "probabilities", "add_reference"]

logger = logging.getLogger(__name__)


def split_logits(package: ModelPackage, split: Any, progress: bool = False) -> np.ndarray:
    """Raw network outputs for every case of ``split`` (through the package's Predictor)."""
    from meddx.inference import Predictor

    predictor = Predictor(package, backend="torch")
    logits, _ = predictor.predict_split(split, progress=progress)
    return np.asarray(logits, dtype=np.float32)


def probabilities(card: ModelCard, logits: np.ndarray, calibrated: bool = True) -> np.ndarray:
    """Per-class probabilities; temperature-scaled when the card has a calibration."""
    task = card.task
    if calibrated and card.calibration is not None and task.kind != "regression":
        return apply_temperature(task, logits, card.calibration.temperature)
    return task.probabilities(torch.from_numpy(np.asarray(logits, np.float32))).numpy()


def _fit_temperature(task: TaskSpec, logits: np.ndarray, targets: np.ndarray) -> Calibration:
    scaler = TemperatureScaler(task).fit(logits, targets)
    raw = task.probabilities(torch.from_numpy(logits)).numpy()
    cal = scaler.transform(logits)
    before, after = compute_metrics(task, targets, raw), compute_metrics(task, targets, cal)
    return Calibration(
        temperature=scaler.temperature_,
        fitted_on="calib",
        ece_before=_finite(calibration_error(task, targets, raw)),
        ece_after=_finite(calibration_error(task, targets, cal)),
        brier_before=_finite(before.get("brier")),
        brier_after=_finite(after.get("brier")),
    )


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def _operating_points(task: TaskSpec, targets: np.ndarray, probs: np.ndarray,
                      cfg: EvaluationConfig) -> tuple[dict[str, Any], str | None]:
    view = binary_view(task, targets, probs)
    if view is None:
        return {}, None
    y, p = view
    if len(y) < 100 or y.sum() < 20:
        logger.warning("operating points fitted on %d calibration cases (%d positive): expect "
                       "them to move at test", len(y), int(y.sum()))
    points, default = {}, None
    for method, target in (("sensitivity", cfg.target_sensitivity),
                           ("specificity", cfg.target_specificity), ("youden", None),
                           ("balanced", None)):
        try:
            sel = ThresholdSelector(method, target or 0.5, task.positive_class).fit(y, p)
        except EvaluationError as e:
            logger.warning("no operating points: %s", e)
            return {}, None
        name = operating_point_name(method, target)
        points[name] = sel.to_card().model_dump(mode="json")
        if method == cfg.default_operating_point:
            default = name
    return points, default


def _conformal(task: TaskSpec, targets: np.ndarray, probs: np.ndarray,
               cfg: EvaluationConfig) -> Conformal:
    multilabel = task.kind == "multilabel"
    cp = ConformalClassifier(cfg.conformal_method, cfg.alpha, multilabel=multilabel)
    cp.fit(probs, targets if multilabel else task.target_index(targets))
    q = np.atleast_1d(np.asarray(cp.threshold_, dtype=float))
    if not np.isfinite(q).all():
        logger.warning("calibration split too small for alpha=%s: sets hold every class",
                       cfg.alpha)
    q = np.minimum(q, 1.0)  # q̂ ≥ 1 already admits every class, under LAC and APS alike
    return Conformal(method=cfg.conformal_method, alpha=cfg.alpha, fitted_on="calib",
                     threshold=q.tolist() if multilabel else float(q[0]), n_calib=cp.n_calib_)


def fit_post_hoc(package: ModelPackage, bundle: Any, eval_config: EvaluationConfig | None = None,
                 ) -> None:
    """Fit temperature, operating points and conformal sets on ``bundle``'s calib split and
    write them into ``package``'s card.

    Args:
        package: the trained package (its card is rewritten).
        bundle: the DataBundle the model was trained on (must hold a ``calib`` split).
        eval_config: targets, alpha and method (``ExperimentConfig.evaluation``).

    Raises:
        EvaluationError: no calib split, or one without cases.
    """
    cfg = eval_config or EvaluationConfig()
    task = package.card.task
    if task.kind == "regression":
        logger.info("regression task: nothing to calibrate")
        return
    calib = bundle.splits.get("calib")
    if calib is None or len(calib) == 0:
        raise EvaluationError("the dataset has no calibration split to fit on",
                              hint="set data.calib_fraction > 0 (default 0.15)")
    logits = split_logits(package, calib)
    targets = np.asarray(calib.targets)
    calibration = _fit_temperature(task, logits, targets) if cfg.calibrate else None
    probs = (apply_temperature(task, logits, calibration.temperature) if calibration
             else task.probabilities(torch.from_numpy(logits)).numpy())
    points, default = _operating_points(task, targets, probs, cfg)
    conformal = _conformal(task, targets, probs, cfg)
    package.update_card(
        reference=training_reference(package, calib, probs),
        calibration=None if calibration is None else calibration.model_dump(mode="json"),
        operating_points=points,
        default_operating_point=default,
        conformal=conformal.model_dump(mode="json"),
    )
    logger.info("post-hoc fits on %d calibration cases: T=%s, operating points %s, conformal "
                "q=%s", len(calib), None if calibration is None else
                round(calibration.temperature, 3), list(points), conformal.threshold)
    from meddx.training.ood import fit_ood_detector

    fit_ood_detector(package, bundle, cfg)


def add_reference(path: Any, bundle: Any = None) -> Any:
    """Fit the training reference into an existing package (one trained before monitoring):
    the calibration split is read again as training split it (the run's config and seed).

    Args:
        path: the package folder.
        bundle: the DataBundle it was trained on (default: loaded from the card's config).

    Returns:
        The updated :class:`~meddx.package.ModelPackage`.
    """
    from meddx.errors import EvaluationError
    from meddx.package import load_package

    package = load_package(path)
    if bundle is None:
        from meddx.modalities.loading import load_bundle

        config = package.card.training.get("config")
        if not config:
            raise EvaluationError("the card holds no training config to read the data with",
                                  path=str(path))
        bundle = load_bundle(config)
    calib = bundle.splits.get("calib")
    if calib is None or len(calib) == 0:
        raise EvaluationError("the dataset has no calibration split", path=str(path))
    probs = probabilities(package.card, split_logits(package, calib))
    package.update_card(reference=training_reference(package, calib, probs))
    return package
