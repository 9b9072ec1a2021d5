"""Fit a package's out-of-distribution detector (with the other post-hoc fits).

The Gaussians are fitted on the **train** split's features: the features the network learned
on, and the largest split (a 512-dimensional covariance needs many cases). The threshold is
the conformal quantile of in-distribution scores no Gaussian saw: **calib**'s (which the
weights never saw either), pooled by default (``evaluation.ood_threshold_scores: auto``)
with the train split's own **out-of-fold** scores, each from Gaussians refitted on the other
``ood_folds - 1`` folds (an in-sample train score would be optimistically low and the rate
exceeded), unless those differ from calib's (the network trained on those cases:
:func:`~meddx.statistics.ood.pool_scores`). 82 calib cases alone leave the realised rate of
a 5% promise anywhere in 1.3-10.3% (95% of calibration draws); pooled with 464 train cases,
in 3.3-6.9%. The final Gaussians are fitted on all of train. Energy detectors (no
Gaussians; the score is the network's own) use calib alone. Test is not touched. The means
and shared precision go into ``ood.safetensors`` (listed in the manifest, sha256-checked);
method, layer, threshold, the scores used and what they promise into the card.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from meddx.config import EvaluationConfig
from meddx.errors import ConfigError, EvaluationError
from meddx.inference.ood import OOD_FILE, detector_method, head_layer, save_detector_arrays
from meddx.package import ModelPackage, OODDetector
from meddx.statistics.ood import (
    MahalanobisScorer,
    crossfit_scores,
    energy_score,
    false_alarm_distribution,
    false_alarm_threshold,
    pool_scores,
)

__all__ = ["fit_ood_detector"]

logger = logging.getLogger(__name__)


def _example(package: ModelPackage) -> Any:
    from meddx.modalities import get_modality
    from meddx.models import MODELS

    builder = MODELS.get(package.card.network["name"])
    spec = get_modality(package.card.modality).network_spec(package.card.preprocessing)
    return builder.example_input(spec, 3)


def _classes(package: ModelPackage, targets: np.ndarray) -> np.ndarray | None:
    task = package.card.task
    if task.kind in ("binary", "multiclass", "ordinal"):
        return task.target_index(targets)
    return None  # multilabel: one class-agnostic Gaussian


def _method(package: ModelPackage, wanted: str) -> str:
    if wanted == "energy":
        return "energy"
    model = package.build_model()
    found = detector_method(model, package.card.task.num_outputs, _example(package))
    if wanted == "mahalanobis" and found != "mahalanobis":
        raise ConfigError(f"network '{package.card.network['name']}' has no linear head layer "
                          "to read features from", hint="set evaluation.ood_detector: energy")
    return found


def _mahalanobis(package: ModelPackage, predictor: Any, train: Any, calib: Any,
                 cfg: EvaluationConfig) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any],
                                                 MahalanobisScorer]:
    """Gaussians on all of train; calib's scores; out-of-fold train scores (unless
    ``cfg.ood_threshold_scores`` is "calib"); the card entries; the fitted scorer."""
    task = package.card.task
    layer, module = head_layer(predictor.model, task.num_outputs)
    predictor.watch_features(layer)
    _, f_train = predictor.split_outputs(train, features=True)
    _, f_calib = predictor.split_outputs(calib, features=True)
    classes = _classes(package, np.asarray(train.targets))
    scorer = MahalanobisScorer().fit(f_train, classes)
    oof = None
    if cfg.ood_threshold_scores != "calib":
        groups = None if train.patient_ids is None else np.asarray(train.patient_ids)
        oof, _ = crossfit_scores(f_train, classes, cfg.ood_folds, seed=0, groups=groups)
    spec = {"layer": layer, "feature_dim": int(module.in_features), "file": OOD_FILE,
            "fitted_on": "train", "n_fit": len(train), "shrinkage": scorer.shrinkage_}
    return scorer.score(f_calib), oof, spec, scorer


def _threshold_spec(calib_scores: np.ndarray, oof: np.ndarray | None, cfg: EvaluationConfig,
                    ) -> dict[str, Any]:
    """The conformal threshold of calib (+ out-of-fold train) scores, and what it promises."""
    rate = cfg.ood_false_alarm
    pool, used, shift_p = pool_scores(calib_scores, oof, cfg.ood_threshold_scores)
    if oof is not None and used == "calib":
        logger.warning("OOD threshold on calib alone: the out-of-fold train scores differ from "
                       "calib's (Mann-Whitney p=%.2g), so they are not pooled", shift_p)
    threshold = false_alarm_threshold(pool, rate)
    dist = false_alarm_distribution(len(pool), rate)
    spec: dict[str, Any] = {
        "threshold": threshold, "n_calib": len(calib_scores), "n_threshold": len(pool),
        "calib_flagged": float(np.mean(calib_scores > threshold)),
        "expected_false_alarm": dist["expected"],
        "false_alarm_interval": [dist["low"], dist["high"]],
        "threshold_scores": used, "crossfit_shift_p": shift_p,
        "threshold_fitted_on": "calib+train" if used == "crossfit" else "calib"}
    if oof is not None:
        spec.update(folds=cfg.ood_folds, n_crossfit=len(oof),
                    crossfit_flagged=float(np.mean(oof > threshold)))
    return spec


def fit_ood_detector(package: ModelPackage, bundle: Any,
                     eval_config: EvaluationConfig | None = None) -> OODDetector | None:
    """Fit the detector on ``bundle``'s train (Gaussians) and calib (+ cross-fitted train:
    threshold) splits and write it into ``package``.

    Returns:
        The card's detector entry, or None (switched off, regression, or too few cases).

    Raises:
        ConfigError: ``mahalanobis`` asked for a network without a linear head.
    """
    from meddx.inference import Predictor

    cfg = eval_config or EvaluationConfig()
    task = package.card.task
    train, calib = bundle.splits.get("train"), bundle.splits.get("calib")
    if cfg.ood_detector == "off" or task.kind == "regression" or not calib or not train:
        return None
    method = _method(package, cfg.ood_detector)
    predictor = Predictor(package, backend="torch")
    spec: dict[str, Any] = {"method": method, "false_alarm": cfg.ood_false_alarm}
    try:
        if method == "mahalanobis":
            scores, oof, fitted, scorer = _mahalanobis(package, predictor, train, calib, cfg)
            spec.update(fitted)
        else:
            if cfg.ood_threshold_scores != "calib":
                logger.info("energy OOD score: threshold on calib alone (the score is the "
                            "network's own, which trained on every train case)")
            scores, oof = energy_score(predictor.split_outputs(calib)[0]), None
            spec.update(fitted_on=None)
        spec.update(_threshold_spec(scores, oof, cfg))
    except EvaluationError as e:
        logger.warning("no OOD detector: %s", e)
        (package.path / OOD_FILE).unlink(missing_ok=True)
        package.update_card(ood=None)
        return None
    if method == "mahalanobis":
        save_detector_arrays(package.path / OOD_FILE, scorer)
    detector = OODDetector(**spec)
    package.update_card(ood=detector.model_dump(mode="json"))  # rewrites the manifest too
    logger.info("OOD detector (%s%s): threshold %.4g for a %.0f%% false-alarm rate on %d "
                "scores (%s; 95%% of such thresholds realise %.1f-%.1f%%)", method,
                f" on {spec['layer']}" if "layer" in spec else "", spec["threshold"],
                100 * cfg.ood_false_alarm, spec["n_threshold"], spec["threshold_fitted_on"],
                *(100 * v for v in spec["false_alarm_interval"]))
    return detector
