"""Evaluate a packaged model on a dataset split the way a clinical study reports it.

``evaluate(model, dataset, split="test", out=DIR)`` reads the package, re-reads the dataset
with the run's own configuration (same seed, same calibration carve), predicts the split once
and computes discrimination with bootstrap CIs, the card's operating points at test,
calibration before/after, conformal coverage, subgroups and the error gallery; with ``out`` it
writes ``report.html``, ``metrics.json`` and the updated ``card.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from meddx.config import DataConfig, ExperimentConfig, parse_config
from meddx.errors import ConfigError, EvaluationError
from meddx.evaluation.sections import (
    calibration_section,
    conformal_section,
    error_cases,
    ood_section,
    operating_point_section,
)
from meddx.package import ModelCard, ModelPackage, load_package
from meddx.statistics import json_safe
from meddx.statistics.bootstrap import bootstrap_metrics
from meddx.statistics.subgroups import SubgroupResult, subgroup_analysis
from meddx.training.posthoc import fit_post_hoc, probabilities, split_logits

__all__ = ["EvaluationResult", "evaluate", "fit_post_hoc", "json_safe"]

logger = logging.getLogger(__name__)


@dataclass
class EvaluationResult:
    """Everything an evaluation found; ``to_dict()`` is what ``metrics.json`` holds."""

    model: dict[str, Any]
    dataset: str
    split: str
    n: int
    task: Any
    metrics: dict[str, dict[str, float]]
    threshold: float | None
    operating_points: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    conformal: dict[str, Any] = field(default_factory=dict)
    ood: dict[str, Any] = field(default_factory=dict)
    subgroups: SubgroupResult | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    bootstrap: dict[str, Any] = field(default_factory=dict)
    card: ModelCard | None = None
    targets: np.ndarray | None = field(default=None, repr=False)
    probs: np.ndarray | None = field(default=None, repr=False)
    probs_raw: np.ndarray | None = field(default=None, repr=False)
    out: Path | None = None
    report: Path | None = None
    external: dict[str, Any] | None = None  # set by meddx.evaluation.external.validate

    def to_dict(self) -> dict[str, Any]:
        sub = None
        if self.subgroups is not None:
            sub = {"split": self.subgroups.split, "metrics": self.subgroups.metrics,
                   "rows": self.subgroups.rows, "notes": self.subgroups.notes}
        return json_safe({
            "model": self.model, "dataset": self.dataset, "split": self.split, "n": self.n,
            "task": self.task.model_dump(mode="json"), "threshold": self.threshold,
            "metrics": self.metrics, "bootstrap": self.bootstrap,
            "operating_points": self.operating_points, "calibration": self.calibration,
            "conformal": self.conformal, "ood": self.ood, "subgroups": sub,
            "errors": [{k: v for k, v in e.items() if k != "image"} for e in self.errors],
            "data": self.data, "notes": self.notes,
            **({"external": self.external} if self.external is not None else {}),
        })


# --------------------------------------------------------------------------- configuration
def _trained_on(card: ModelCard) -> str | None:
    return card.training_data.get("dataset") or (
        card.training.get("config", {}).get("data", {}).get("dataset"))


def _check_entry(card: ModelCard, dataset: str) -> None:
    """A catalog dataset must have the model's modality and label space."""
    from meddx.catalog import get_entry

    entry = get_entry(dataset)
    same = (entry.modality == card.modality and entry.task.kind == card.task.kind
            and entry.task.class_names == card.task.class_names)
    if not same:
        raise EvaluationError(
            f"model '{card.name}' was trained on '{_trained_on(card) or 'unknown data'}' "
            f"({card.modality}; {card.task.describe()}), but '{dataset}' is {entry.modality} "
            f"data with {entry.task.describe()}",
            hint="evaluate on a dataset with the same modality and classes, or train a model "
            "for this one",
        )


def _resolve_config(card: ModelCard, dataset: str | None,
                    config: ExperimentConfig | str | Path | dict | None) -> ExperimentConfig:
    if config is not None:
        from meddx.modalities.loading import as_config

        return as_config(config)
    raw = card.training.get("config")
    cfg = parse_config(raw) if raw else ExperimentConfig(
        data=DataConfig(dataset=_trained_on(card), size=card.preprocessing.get("size")),
        task=card.task)
    if dataset and dataset != cfg.data.dataset:
        _check_entry(card, dataset)
        raw = cfg.model_dump(mode="json")
        raw["data"] = {"dataset": dataset, "size": card.preprocessing.get("size"),
                       "calib_fraction": cfg.data.calib_fraction}
        raw["task"] = None
        cfg = parse_config(raw)
    if not cfg.data.dataset and not cfg.data.path:
        raise EvaluationError("the model card does not say which data it was trained on",
                              hint="pass --dataset NAME (or a config)")
    return cfg


def _check_bundle(card: ModelCard, bundle: Any, split: str) -> None:
    task = bundle.task
    if bundle.modality != card.modality or task.kind != card.task.kind or \
            task.class_names != card.task.class_names:
        raise EvaluationError(
            f"model '{card.name}' ({card.modality}; {card.task.describe()}) does not fit "
            f"dataset '{bundle.dataset}' ({bundle.modality}; {task.describe()})",
            hint="evaluate on the data the model was trained for")
    for key in ("spatial_dims", "channels", "size"):
        want, got = card.preprocessing.get(key), bundle.input_spec.get(key)
        if want is not None and got is not None and want != got:
            raise EvaluationError(
                f"dataset '{bundle.dataset}' gives inputs with {key}={got}; the model takes {want}",
                hint=f"use the dataset at {key} {want}")
    if split not in bundle.splits or len(bundle.splits[split]) == 0:
        raise EvaluationError(f"dataset '{bundle.dataset}' has no split '{split}'",
                              hint="choose one of: " + ", ".join(
                                  s for s, v in bundle.splits.items() if len(v)))


# ------------------------------------------------------------------------------ pieces
def _threshold(card: ModelCard) -> float | None:
    op = card.operating_point
    return None if op is None else op.threshold


def _subgroups(package: ModelPackage, bundle: Any, split: str, logits: np.ndarray,
               n_resamples: int, seed: int, notes: list[str]) -> SubgroupResult | None:
    """Subgroups on ``split``, or on the split that carries metadata (named in the result)."""
    def has_meta(s: Any) -> bool:
        return s.metadata is not None and len(s.metadata.columns) > 0 and len(s) > 0

    chosen = split if has_meta(bundle.splits[split]) else next(
        (s for s in ("val", "calib", "test") if s in bundle.splits and has_meta(bundle.splits[s])),
        None)
    if chosen is None:
        notes.append("no split carries metadata (sex, age, site …): no subgroup analysis")
        return None
    s = bundle.splits[chosen]
    z = logits if chosen == split else split_logits(package, s)
    probs = probabilities(package.card, z)
    derived = set(package.card.preprocessing.get("derived_features") or [])
    meta = s.metadata.drop(columns=[c for c in s.metadata.columns if c in derived])
    result = subgroup_analysis(package.card.task, s.targets, probs, meta,
                               _threshold(package.card), s.patient_ids, n_resamples, seed)
    result.split = chosen
    if chosen != split:
        role = {"val": "chose the model (early stopping), so these figures are optimistic",
                "calib": "fitted the temperature and thresholds, so these figures are optimistic"}
        result.notes.insert(0, f"the {split} split carries no metadata; subgroups are analysed "
                            f"on the {chosen} split, which {role.get(chosen, 'is not test')}")
    return result


def _logits_and_ood(package: ModelPackage, split: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Outputs of every case (fused with the split's side inputs where the card has them) and,
    where the package has a detector, their OOD scores on the network's own outputs (one forward
    pass: the detector's features are read on the way)."""
    from meddx.inference import Predictor

    predictor = Predictor(package, backend="torch")
    z, f = predictor.split_outputs(split, features=True)
    scores = predictor.ood_scores(z, f)
    return np.asarray(predictor.fuse_split(z, split), dtype=np.float32), scores


def _data_section(bundle: Any, split: str) -> dict[str, Any]:
    info = {k: v for k, v in bundle.info.items() if isinstance(v, str | int | float | bool)}
    out = {"dataset": bundle.dataset, "modality": bundle.modality, "info": info,
           **bundle.summary()}
    dropped = bundle.info.get("dropped_lines")  # counted by the reader while the data were read
    if isinstance(dropped, dict) and "by_split" in dropped:
        out["dropped_lines"] = dropped
    return out


def _write_outputs(result: EvaluationResult, package: ModelPackage, out: Path,
                   report: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False))
    shutil.copyfile(package.path / "card.json", out / "card.json")
    if report:
        from meddx.reporting import write_report

        result.report = write_report(result, out / "report.html")


def _record_in_card(package: ModelPackage, result: EvaluationResult) -> None:
    metrics = dict(package.card.metrics)
    metrics[f"{result.dataset}/{result.split}"] = json_safe({
        "n": result.n, "threshold": result.threshold,
        "operating_point": package.card.default_operating_point,
        "bootstrap": result.bootstrap,
        **{k: v for k, v in result.metrics.items() if "[" not in k},
    })
    package.update_card(metrics=metrics)
    result.card = package.card


# ------------------------------------------------------------------------------- evaluate
def evaluate(
    model_path: str | Path | ModelPackage,
    dataset: str | None = None,
    split: str = "test",
    out: str | Path | None = None,
    config: ExperimentConfig | str | Path | dict | None = None,
    bootstrap: int = 1000,
    subgroups: bool = True,
    seed: int = 0,
    report: bool = True,
    explain: bool = True,
    update_card: bool = True,
    bundle: Any | None = None,
) -> EvaluationResult:
    """Evaluate a packaged model on one split of a dataset.

    Args:
        model_path: the package folder (or a loaded ModelPackage).
        dataset: catalog name; default: the dataset the model was trained on.
        split: ``test`` (default), ``val``, ``calib`` …
        out: folder for ``report.html``, ``metrics.json`` and ``card.json`` (None: no files).
        config: the experiment config to re-read the data with (default: the one in the card).
        bootstrap: resamples for the 95% intervals (0: none).
        subgroups: analyse metadata subgroups where a split carries them.
        seed: bootstrap seed.
        report: write ``report.html`` (with ``out``).
        explain: Grad-CAM/attribution pictures in the error gallery.
        update_card: record the metrics in the package's card.
        bundle: an already loaded DataBundle to use instead of reading the data again.

    Raises:
        ModelError: the package is missing or tampered with.
        EvaluationError: a dataset the model was not trained for, or a split that does not exist.
        DataError / ConfigError: the dataset cannot be read.
    """
    from meddx.modalities import get_modality
    from meddx.modalities.loading import load_bundle

    package = model_path if isinstance(model_path, ModelPackage) else load_package(model_path)
    card = package.card
    cfg = _resolve_config(card, dataset, config)
    if bundle is None:
        try:
            bundle = load_bundle(cfg)
        except ConfigError as e:
            raise EvaluationError(f"cannot read the evaluation data: {e.message}",
                                  hint=e.hint) from e
    _check_bundle(card, bundle, split)
    notes: list[str] = []
    if card.calibration is None and not card.operating_points and card.conformal is None \
            and "calib" in bundle.splits and len(bundle.splits["calib"]):
        logger.info("the card has no post-hoc fits: fitting them on calib now")
        fit_post_hoc(package, bundle, cfg.evaluation)
        card = package.card
    if split in ("train", "calib"):
        notes.append(f"evaluated on '{split}', which the model was fitted on: figures are "
                     "optimistic")
    s = bundle.splits[split]
    logits, ood_scores = _logits_and_ood(package, s)
    task = card.task
    raw, probs = probabilities(card, logits, False), probabilities(card, logits)
    targets = np.asarray(s.targets)
    threshold = _threshold(card)
    ci = bootstrap_metrics(task, targets, probs, threshold, s.patient_ids, bootstrap, seed)
    notes += ci.notes
    result = EvaluationResult(
        model={"name": card.name, "version": card.version, "sha256": package.sha256,
               "path": str(package.path), "trained_on": _trained_on(card)},
        dataset=bundle.dataset, split=split, n=len(s), task=task, metrics=dict(ci),
        threshold=threshold, card=card, targets=targets, probs=probs, probs_raw=raw,
        notes=notes, data=_data_section(bundle, split),
        bootstrap={"resamples": bootstrap, "seed": seed, "confidence": 0.95,
                   "by_patient": bool(s.patient_ids), "stratified": True},
        operating_points=operating_point_section(task, card, targets, probs, bootstrap, seed,
                                                 s.patient_ids),
        calibration=calibration_section(task, card, targets, raw, probs),
        conformal=conformal_section(task, card, targets, probs),
        ood=ood_section(card, ood_scores),
        errors=error_cases(task, targets, probs, s.ids, threshold),
    )
    if subgroups:
        result.subgroups = _subgroups(package, bundle, split, logits, bootstrap, seed, notes)
    if explain:
        from meddx.explain.gallery import attach_explanations

        attach_explanations(package, get_modality(card.modality), s, result.errors)
    if update_card:
        _record_in_card(package, result)
    if out is not None:
        result.out = Path(out)
        _write_outputs(result, package, Path(out), report)
    return result
