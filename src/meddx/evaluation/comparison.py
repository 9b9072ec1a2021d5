"""Paired comparison of two packaged models on the same cases (``meddx compare``).

DeLong's test compares the AUROCs (of the positive class; one-vs-rest per class or per label
when the task names none); McNemar's test compares the two models' correct calls at their own
default operating points (else the most probable class).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from meddx.errors import ConfigError, EvaluationError
from meddx.evaluation.evaluator import _check_bundle, _resolve_config, json_safe
from meddx.package import ModelPackage, load_package
from meddx.statistics.compare import delong_test, mcnemar_test
from meddx.statistics.metrics import binary_view
from meddx.training.posthoc import probabilities, split_logits

__all__ = ["compare_models"]

logger = logging.getLogger(__name__)


def _predict(package: ModelPackage, dataset: str | None, split: str,
             cache: dict[str, Any]) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
    """(id → row, targets, calibrated probabilities) of ``package`` on ``split``."""
    from meddx.modalities.loading import load_bundle

    cfg = _resolve_config(package.card, dataset, None)
    key = cfg.data.model_dump_json()
    if key not in cache:
        try:
            cache[key] = load_bundle(cfg)
        except ConfigError as e:
            raise EvaluationError(f"cannot read the comparison data: {e.message}",
                                  hint=e.hint) from e
    bundle = cache[key]
    _check_bundle(package.card, bundle, split)
    s = bundle.splits[split]
    probs = probabilities(package.card, split_logits(package, s))
    return {sid: i for i, sid in enumerate(s.ids)}, np.asarray(s.targets), probs


def _correct(package: ModelPackage, targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
    task, op = package.card.task, package.card.operating_point
    view = binary_view(task, targets, probs)
    if view is not None and op is not None:
        return (view[1] >= op.threshold) == (view[0] == 1)
    if task.kind == "binary":
        return (view[1] >= 0.5) == (view[0] == 1)  # type: ignore[index]
    if task.kind == "multilabel":
        t = np.asarray(targets, dtype=float)
        known = ~np.isnan(t)
        return (((probs >= 0.5) == (t == 1)) | ~known).all(axis=1)
    return probs.argmax(axis=1) == task.target_index(targets)


def _delong(task: Any, targets: np.ndarray, pa: np.ndarray, pb: np.ndarray) -> dict[str, Any]:
    view_a = binary_view(task, targets, pa)
    if view_a is not None:
        view_b = binary_view(task, targets, pb)
        return {task.positive_class: delong_test(view_a[0], view_a[1], view_b[1])}  # type: ignore
    out = {}
    t = np.asarray(targets, dtype=float)
    for k, name in enumerate(task.class_names):
        if task.kind == "multilabel":
            known = ~np.isnan(t[:, k])
            y, a, b = t[known, k].astype(int), pa[known, k], pb[known, k]
        else:
            y, a, b = (task.target_index(targets) == k).astype(int), pa[:, k], pb[:, k]
        try:
            out[name] = delong_test(y, a, b)
        except EvaluationError as e:
            logger.warning("DeLong for '%s' skipped: %s", name, e)
    return out


def compare_models(model_a: str | Path, model_b: str | Path, dataset: str | None = None,
                   split: str = "test") -> dict[str, Any]:
    """DeLong (AUROC) and McNemar (correct calls) tests of two models on the same cases.

    Raises:
        EvaluationError: models with different label spaces, or no cases in common.
    """
    a, b = load_package(model_a), load_package(model_b)
    ta, tb = a.card.task, b.card.task
    if ta.kind != tb.kind or ta.class_names != tb.class_names or a.card.modality != b.card.modality:
        raise EvaluationError(
            f"the models answer different questions: '{a.card.name}' {ta.describe()} vs "
            f"'{b.card.name}' {tb.describe()}", hint="compare models trained for the same task")
    if ta.kind == "regression":
        raise EvaluationError("model comparison needs a classification task")
    cache: dict[str, Any] = {}
    ids_a, y_a, p_a = _predict(a, dataset, split, cache)
    ids_b, _, p_b = _predict(b, dataset or _dataset_of(a), split, cache)
    common = [sid for sid in ids_a if sid in ids_b]
    if not common:
        raise EvaluationError("the two models' evaluation splits share no cases")
    ia, ib = [ids_a[s] for s in common], [ids_b[s] for s in common]
    y, pa, pb = y_a[ia], p_a[ia], p_b[ib]
    return json_safe({
        "dataset": dataset or _dataset_of(a), "split": split, "n": len(common),
        "model_a": {"name": a.card.name, "path": str(a.path),
                    "operating_point": a.card.default_operating_point},
        "model_b": {"name": b.card.name, "path": str(b.path),
                    "operating_point": b.card.default_operating_point},
        "delong": _delong(ta, y, pa, pb),
        "mcnemar": mcnemar_test(_correct(a, y, pa), _correct(b, y, pb)),
    })


def _dataset_of(package: ModelPackage) -> str | None:
    return package.card.training_data.get("dataset")
