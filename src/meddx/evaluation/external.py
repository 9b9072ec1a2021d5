"""External validation: a package evaluated on data from somewhere else.

``validate(model, data, out=DIR)`` reads ``data`` **with the package's own preprocessing** (the
normalisation fitted on the training data, never refitted on the new data), predicts every case
once, and writes the same report as :func:`~meddx.evaluation.evaluator.evaluate`, marked
*external*, with what shows a transport failure first: calibration-in-the-large and the
calibration slope with bootstrap CIs, and for every operating point of the card (the default
first) whether it still keeps its promise on these data: its target where it has one (e.g.
``sensitivity@0.95``), else its sensitivity and specificity on the calibration split.

Data it reads:

* an ICU model (``ehr``): a folder of PhysioNet 2012 stay files (``*/NNNNNN.txt``) with its
  ``Outcomes*.txt``; lines the reader cannot use (e.g. ``10:45,,1.9``, an empty parameter name)
  are skipped and counted by reason in the report — never a crash, never silent; stays with no
  usable observation cannot be assessed and are counted as refused;
* any other modality: a CSV ``path,label`` (or a folder holding ``labels.csv``), each input read
  by the modality's own reader (``Modality.read``); an input that cannot be read is left out
  and counted with its reason;
* any other file or folder: read exactly as ``meddx evaluate`` reads a dataset (the
  modality's ``load``, with the options the model was trained with, e.g. a MedMNIST ``.npz``),
  and one of its splits (``test`` unless told otherwise) is the external data.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from meddx.config import ExperimentConfig, parse_config
from meddx.errors import ConfigError, DataError, EvaluationError
from meddx.evaluation.evaluator import EvaluationResult, _check_bundle, _write_outputs, evaluate
from meddx.modalities import DataBundle, Modality, Split, get_modality
from meddx.package import ModelPackage, load_package
from meddx.statistics.calibration import calibration_transport
from meddx.statistics.metrics import binary_view

__all__ = ["validate", "external_bundle", "dataset_bundle", "transport_section", "SPLIT"]

logger = logging.getLogger(__name__)

SPLIT = "external"


# ------------------------------------------------------------------------------ reading
def external_bundle(package: ModelPackage, data: str | Path, split: str = "test") -> DataBundle:
    """External data as a bundle with one split, ``external``, read with the package's own
    preprocessing.

    A labels CSV (``path,label``, or a folder holding ``labels.csv``) and a layout the modality
    reads itself (``Modality.read_external``, e.g. a PhysioNet 2012 folder) are read case by
    case; any other file or folder is read the way ``meddx evaluate`` reads a dataset (see
    :func:`dataset_bundle`), ``split`` of it being the external data.

    Raises:
        DataError: the data cannot be found or read, or no case is left to evaluate.
        EvaluationError: the data do not fit the model, or have no such split.
        ConfigError: ``split`` other than ``test`` for data read case by case.
    """
    data = Path(data)
    if not data.exists():
        raise DataError("no such external data", path=str(data))
    card = package.card
    modality = get_modality(card.modality)
    if not _case_by_case(modality, data):
        return dataset_bundle(package, data, split)
    if split != "test":
        raise ConfigError(f"split '{split}' applies to a dataset file with splits; {data.name} "
                          "is read case by case, every case being external",
                          hint="leave out --split")
    tensors, targets, ids, info = modality.read_external(data, card.preprocessing, card.task)
    if not ids:
        raise DataError("no case of the external data could be read", path=str(data))
    derived = info.pop("derived", None)
    meta = pd.DataFrame(derived) if derived and len(derived) == len(ids) else None
    ext = Split(name=SPLIT, inputs=tensors, targets=np.asarray(targets), ids=ids, metadata=meta)
    return DataBundle(dataset=data.name or str(data), modality=card.modality, task=card.task,
                      splits={SPLIT: ext}, input_spec=dict(card.preprocessing), info=info)


def _case_by_case(modality: Modality, data: Path) -> bool:
    """A labels CSV, or a modality with a layout of its own for external data."""
    if type(modality).read_external is not Modality.read_external:
        return True
    if data.is_dir():
        return (data / "labels.csv").is_file()
    return data.suffix.lower() == ".csv"


def dataset_bundle(package: ModelPackage, data: Path, split: str = "test") -> DataBundle:
    """A dataset file or folder read as ``meddx evaluate`` reads one (the modality's ``load``
    with the data options the model was trained with, e.g. ``format: medmnist``), keeping
    ``split`` as the external split.

    Raises:
        DataError: the file cannot be read.
        EvaluationError: it does not fit the model, or has no such split.
    """
    from meddx.catalog import get_entry
    from meddx.modalities.loading import load_bundle

    card = package.card
    cfg = _config(package)
    options: dict[str, Any] = {}
    if cfg.data.dataset:
        try:
            options.update(get_entry(cfg.data.dataset).options)
        except ConfigError:  # trained on a dataset this installation's catalog lacks
            logger.info("training dataset %s is not in the catalog", cfg.data.dataset)
    options.update(cfg.data.options)
    raw = cfg.model_dump(mode="json")
    raw["data"] = {**raw["data"], "dataset": None, "path": str(data), "modality": card.modality,
                   "options": options, "limit": None,
                   "size": card.preprocessing.get("size", raw["data"].get("size"))}
    raw["task"] = card.task.model_dump(mode="json")
    try:
        bundle = load_bundle(parse_config(raw))
    except ConfigError as e:
        raise EvaluationError(f"cannot read the external data: {e.message}", hint=e.hint) from e
    _check_bundle(card, bundle, split)
    chosen = bundle.splits[split]
    ext = Split(name=SPLIT, inputs=chosen.inputs, targets=chosen.targets, ids=chosen.ids,
                patient_ids=chosen.patient_ids, metadata=chosen.metadata)
    info = {**bundle.info, "source": str(data), "format": f"dataset file, split '{split}'"}
    return DataBundle(dataset=data.name, modality=card.modality, task=card.task,
                      splits={SPLIT: ext}, input_spec=bundle.input_spec, info=info)


# --------------------------------------------------------------------------- transport
def _finite(x: Any) -> bool:
    return x is not None and np.isfinite(x)


def _promise(name: str, op: dict[str, Any]) -> dict[str, Any] | None:
    """What operating point ``name`` promised and what it does on these data: a target point
    (``sensitivity@0.95``) against its target; a point without one (``balanced``, ``youden``)
    against its sensitivity and specificity on the calibration split. None for a point with
    no figures (e.g. a degenerate split)."""
    metrics = op.get("metrics") or {}
    row: dict[str, Any] = {
        "operating_point": name, "default": bool(op.get("default")),
        "threshold": op.get("threshold"), "method": op.get("method"),
        "sensitivity": metrics.get("sensitivity"), "specificity": metrics.get("specificity"),
        "calib_sensitivity": op.get("calib_sensitivity"),
        "calib_specificity": op.get("calib_specificity"),
    }
    method, target = op.get("method"), op.get("target")
    if method in ("sensitivity", "specificity") and target is not None:
        m = metrics.get(method) or {}
        value, high = m.get("value"), m.get("high")
        if not _finite(value):
            return None
        status = "holds" if value >= target else (
            "broken" if _finite(high) and high < target else "uncertain")
        return {**row, "metric": method, "target": target, "value": value, "low": m.get("low"),
                "high": high, "status": status}
    below = [k for k in ("sensitivity", "specificity")
             if _finite(row[f"calib_{k}"]) and _finite((metrics.get(k) or {}).get("high"))
             and metrics[k]["high"] < row[f"calib_{k}"]]
    known = any(_finite((metrics.get(k) or {}).get("value")) for k in ("sensitivity",
                                                                        "specificity"))
    if not known:
        return None
    return {**row, "metric": None, "target": None, "value": None, "low": None, "high": None,
            "status": "below calibration" if below else "as on calibration", "below": below}


def _promises(operating_points: dict[str, Any]) -> list[dict[str, Any]]:
    """Every stored operating point, the default first, then in the card's order."""
    rows = [p for name, op in operating_points.items() if (p := _promise(name, op)) is not None]
    return sorted(rows, key=lambda p: not p["default"])


def transport_section(result: EvaluationResult, n_resamples: int, seed: int
                      ) -> dict[str, Any]:
    """Calibration-in-the-large, calibration slope (with CIs) and the operating points'
    promises on the external data; ``warnings`` in words."""
    out: dict[str, Any] = {"calibration": None, "promises": [], "warnings": []}
    view = binary_view(result.task, result.targets, result.probs)
    if view is not None and 0 < view[0].sum() < len(view[0]):
        cal = calibration_transport(view[0], view[1], n_resamples, seed)
        out["calibration"] = cal
        s, a = cal["slope"], cal["intercept"]
        if np.isfinite(s["high"]) and s["high"] < 1:
            out["warnings"].append(f"calibration slope {s['value']:.2f} (95% CI {s['low']:.2f}-"
                                   f"{s['high']:.2f}) is below 1: the predicted risks are too "
                                   "extreme on these data")
        elif np.isfinite(s["low"]) and s["low"] > 1:
            out["warnings"].append(f"calibration slope {s['value']:.2f} (95% CI {s['low']:.2f}-"
                                   f"{s['high']:.2f}) is above 1: the predicted risks are too "
                                   "modest on these data")
        if np.isfinite(a["low"]) and (a["low"] > 0 or a["high"] < 0):
            direction = "under" if a["value"] > 0 else "over"
            out["warnings"].append(f"calibration-in-the-large {a['value']:+.2f} (95% CI "
                                   f"{a['low']:+.2f} to {a['high']:+.2f}): the model "
                                   f"{direction}-predicts the mean risk on these data")
    out["promises"] = _promises(result.operating_points)
    for p in out["promises"]:
        name = p["operating_point"]
        if p["status"] == "broken":
            out["warnings"].append(
                f"operating point {name} no longer holds its promise: {p['metric']} "
                f"{p['value']:.3f} (95% CI {p['low']:.3f}-{p['high']:.3f}) is below the target "
                f"{p['target']:.2f}")
    return out


# ---------------------------------------------------------------------------- validate
def _config(package: ModelPackage) -> ExperimentConfig:
    raw = package.card.training.get("config")
    return parse_config(raw) if raw else ExperimentConfig(task=package.card.task)


def validate(model_path: str | Path | ModelPackage, data: str | Path,
             out: str | Path | None = None, bootstrap: int = 1000, seed: int = 0,
             explain: bool = False, report: bool = True, split: str = "test"
             ) -> EvaluationResult:
    """Evaluate a package on external data and write the report marked *external*.

    Args:
        model_path: the package folder (or a loaded package).
        data: a PhysioNet-layout folder with its outcomes (ICU models), a CSV / folder with
            ``labels.csv`` (other modalities), or any dataset file ``meddx evaluate`` reads
            (e.g. a MedMNIST ``.npz``).
        out: folder for ``report.html`` and ``metrics.json`` (None: no files).
        bootstrap: resamples for the 95% intervals.
        seed: bootstrap seed.
        explain: attributions in the error gallery.
        report: write ``report.html`` (with ``out``).
        split: the split of a dataset file that is the external data (default ``test``).

    Raises:
        ModelError, DataError, EvaluationError: see :func:`evaluate` and
        :func:`external_bundle`.
    """
    package = model_path if isinstance(model_path, ModelPackage) else load_package(model_path)
    bundle = external_bundle(package, data, split)
    if bundle.modality != package.card.modality:
        raise EvaluationError("external data of another modality")
    result = evaluate(package, split=SPLIT, config=_config(package), bootstrap=bootstrap,
                      seed=seed, report=False, explain=explain, update_card=False,
                      subgroups=False, bundle=bundle)
    result.external = transport_section(result, bootstrap, seed)
    result.external["trained_on"] = result.model.get("trained_on")
    result.external["left_out_cases"] = bundle.info.get("left_out_by_reason", {})
    result.notes += [f"external validation: {w}" for w in result.external["warnings"]]
    if out is not None:
        result.out = Path(out)
        _write_outputs(result, package, Path(out), report)
    return result
