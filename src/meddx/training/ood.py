"""Fit a package's out-of-distribution detector (with the other post-hoc fits).

The Gaussians are fitted on the **train** split's features: the features the network learned
on, and the largest split (a 512-dimensional covariance needs many cases). The threshold is
chosen on **calib**, which the weights never saw, so the stated false-alarm rate holds for new
in-distribution inputs (train scores would be optimistically low and the rate would be
exceeded). Test is not touched. The means and shared precision go into ``ood.safetensors``
(listed in the manifest, sha256-checked); method, layer, threshold and rate into the card.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from meddx.config import EvaluationConfig
from meddx.errors import ConfigError, EvaluationError
from meddx.inference.ood import OOD_FILE, detector_method, head_layer, save_detector_arrays
from meddx.package import ModelPackage, OODDetector
from meddx.statistics.ood import MahalanobisScorer, energy_score, false_alarm_threshold

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


def fit_ood_detector(package: ModelPackage, bundle: Any,
                     eval_config: EvaluationConfig | None = None) -> OODDetector | None:
    """Fit the detector on ``bundle``'s train (Gaussians) and calib (threshold) splits and
    write it into ``package``.

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
    if method == "mahalanobis":
        layer, module = head_layer(predictor.model, task.num_outputs)
        predictor.watch_features(layer)
        _, f_train = predictor.split_outputs(train, features=True)
        z_calib, f_calib = predictor.split_outputs(calib, features=True)
        scorer = MahalanobisScorer().fit(f_train, _classes(package, np.asarray(train.targets)))
        scores = scorer.score(f_calib)
        save_detector_arrays(package.path / OOD_FILE, scorer)
        spec.update(layer=layer, feature_dim=int(module.in_features), file=OOD_FILE,
                    fitted_on="train", n_fit=len(train), shrinkage=scorer.shrinkage_)
    else:
        z_calib, _ = predictor.split_outputs(calib)
        scores = energy_score(z_calib)
        spec.update(fitted_on=None)
    try:
        threshold = false_alarm_threshold(scores, cfg.ood_false_alarm)
    except EvaluationError as e:
        logger.warning("no OOD detector: %s", e)
        (package.path / OOD_FILE).unlink(missing_ok=True)
        package.update_card(ood=None)
        return None
    spec.update(threshold=threshold, n_calib=len(calib),
                calib_flagged=float(np.mean(scores > threshold)))
    detector = OODDetector(**spec)
    package.update_card(ood=detector.model_dump(mode="json"))  # rewrites the manifest too
    logger.info("OOD detector (%s%s): threshold %.4g for a %.0f%% false-alarm rate on %d "
                "calibration cases", method, f" on {spec['layer']}" if "layer" in spec else "",
                threshold, 100 * cfg.ood_false_alarm, len(calib))
    return detector
