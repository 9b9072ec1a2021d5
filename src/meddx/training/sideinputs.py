"""Late fusion of side inputs (age, sex, site) with the image network, fitted on calib.

Why late fusion on calib (and not a side-input branch inside the network, as most ISIC papers
do): the image network and its training stay exactly as they are (one recipe, one set of
weights, its ONNX export unchanged), the fit takes seconds instead of a retraining, and a
logistic model over the image logits and a handful of encoded values is hard to overfit on a
few hundred calibration cases. The cost: interactions between image features and the patient
(e.g. what a lesion on the back means at 70) are not learnt — only an additive shift of each
class's log-odds.

:func:`fit_side_inputs` writes a :class:`~meddx.sideinputs.SideInputFusion` into the card; the
post-hoc fits (temperature, operating points, conformal) that follow then act on the fused
logits, since :meth:`~meddx.inference.Predictor.predict_split` fuses with the split's metadata.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from meddx.errors import ConfigError, EvaluationError
from meddx.package import ModelPackage
from meddx.sideinputs import SideInput, SideInputFusion, parse_records

__all__ = ["fit_side_inputs", "split_records"]

logger = logging.getLogger(__name__)


def split_records(split: Any, inputs: Sequence[SideInput]) -> list[dict[str, Any]]:
    """One raw record per case from the split's metadata (empty records: no metadata).

    Raises:
        ConfigError: the metadata has none of an input's columns (name or aliases).
    """
    meta = getattr(split, "metadata", None)
    if meta is None or len(meta.columns) == 0:
        raise ConfigError(f"the {split.name} split carries no metadata for the side inputs "
                          f"({', '.join(s.name for s in inputs)})",
                          hint="use a dataset whose CSV has these columns (e.g. isic2017's "
                               "age and sex)")
    cols = set(meta.columns)
    for s in inputs:
        if not cols & {s.name, *s.aliases}:
            raise ConfigError(f"side input '{s.name}' is not a metadata column of the "
                              f"{split.name} split", hint=f"its columns: {', '.join(sorted(cols))}")
    return meta.reset_index(drop=True).to_dict("records")


def _standardised(inputs: Sequence[SideInput], values: list[dict[str, Any]]) -> list[SideInput]:
    out = []
    for s in inputs:
        if s.kind == "numeric":
            xs = np.array([v[s.name] for v in values if v[s.name] is not None], dtype=float)
            mean = float(xs.mean()) if len(xs) else 0.0
            std = float(xs.std()) if len(xs) > 1 and xs.std() > 0 else 1.0
            s = s.model_copy(update={"mean": mean, "std": std})
        out.append(s)
    return out


def _coefficients(lr: Any, n_outputs: int) -> tuple[list[list[float]], list[float]]:
    coef, icpt = np.asarray(lr.coef_), np.asarray(lr.intercept_)
    if n_outputs == 2 and coef.shape[0] == 1:  # two-class softmax: split the log-odds
        coef, icpt = np.vstack([-coef / 2, coef / 2]), np.concatenate([-icpt / 2, icpt / 2])
    return coef.tolist(), icpt.tolist()


def _record_logits(predictor: Any, split: Any) -> np.ndarray:
    """Unfused logits of every case as ``meddx predict`` sees it: a windowed record (ECG) is
    the mean of its windows' logits, anything else is the network's one output."""
    modality, spec = predictor.modality, predictor.card.preprocessing
    if spec.get("stride") and hasattr(modality, "windows_of") and hasattr(modality,
                                                                          "aggregate_logits"):
        return np.stack([modality.aggregate_logits(predictor.logits(modality.windows_of(x, spec)),
                                                   predictor.task) for x in split.inputs])
    return predictor.predict_split(split, fused=False)[0]


def fit_side_inputs(package: ModelPackage, bundle: Any, inputs: Sequence[SideInput],
                    c: float = 1.0, derived: Sequence[str] = ()) -> SideInputFusion:
    """Fit the late fusion on ``bundle``'s calib split and write it into the card.

    Args:
        package: the trained package (its card is rewritten).
        bundle: the DataBundle it was trained on; its calib split must carry the inputs as
            metadata columns.
        inputs: the side inputs (:attr:`meddx.config.ExperimentConfig.side_inputs`).
        c: inverse L2 strength of the logistic model (scikit-learn's ``C``).
        derived: metadata columns the modality derived from each input (the ECG's
            ``rhythm:*`` features; ``bundle.input_spec["derived_features"]``).

    Raises:
        ConfigError: a task other than binary/multiclass, or metadata without the inputs.
        EvaluationError: no calib split, or one missing a class.
    """
    from sklearn.linear_model import LogisticRegression

    from meddx.inference import Predictor

    task = package.card.task
    if task.kind not in ("binary", "multiclass"):
        raise ConfigError(f"side inputs fuse with binary or multiclass tasks, not {task.kind}")
    calib = bundle.splits.get("calib")
    if calib is None or len(calib) == 0:
        raise EvaluationError("side inputs are fitted on the calibration split; there is none",
                              hint="set data.calib_fraction > 0")
    values = parse_records(inputs, split_records(calib, inputs))
    fitted = _standardised(inputs, values)
    logits = _record_logits(Predictor(package, backend="torch"), calib)
    names = ([task.positive_class or "positive"] if task.num_outputs == 1
             else list(task.class_names))
    extra: dict[str, Any] = {}
    x_derived = None
    if derived:
        lacking = [c for c in derived if c not in calib.metadata.columns]
        if lacking:
            raise ConfigError(f"derived feature '{lacking[0]}' is not a metadata column of calib")
        x_derived = calib.metadata[list(derived)].to_numpy(dtype=np.float64)
        fill = np.nanmedian(np.where(np.isfinite(x_derived), x_derived, np.nan), axis=0)
        fill = np.where(np.isfinite(fill), fill, 0.0)
        filled = np.where(np.isfinite(x_derived), x_derived, fill)
        std = filled.std(axis=0)
        extra = {"derived": list(derived), "derived_fill": fill.tolist(),
                 "derived_mean": filled.mean(axis=0).tolist(),
                 "derived_std": np.where(std > 0, std, 1.0).tolist()}
    fusion = SideInputFusion(inputs=fitted, image_features=[f"logit:{n}" for n in names],
                             coef=[[0.0]], intercept=[0.0], **extra)
    targets = np.asarray(calib.targets)
    # a binary network's one logit is the positive class's log-odds: fit on "is positive"
    y = (targets.astype(int).reshape(-1) == 1).astype(int) if task.num_outputs == 1 \
        else task.target_index(targets)
    if len(np.unique(y)) != len(task.class_names):
        raise EvaluationError("the calibration split lacks a class: side inputs cannot be fitted")
    lr = LogisticRegression(C=c, max_iter=5000).fit(fusion.design(logits, values, x_derived), y)
    coef, icpt = _coefficients(lr, task.num_outputs)
    missing = {s.name: sum(v[s.name] is None for v in values) for s in inputs}
    fusion = fusion.model_copy(update={"coef": coef, "intercept": icpt, "n_fit": len(values),
                                       "missing_in_fit": missing, "regularisation_c": c})
    package.update_card(side_inputs=fusion.model_dump(mode="json"))
    logger.info("side inputs %s%s fused on %d calibration cases (missing: %s)",
                [s.name for s in inputs], f" and {len(derived)} derived features" if derived
                else "", len(values), missing)
    return fusion
