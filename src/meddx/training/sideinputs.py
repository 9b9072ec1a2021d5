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
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from meddx.errors import ConfigError, EvaluationError
from meddx.package import ModelPackage
from meddx.sideinputs import SideInput, SideInputFusion, parse_records

__all__ = ["fit_side_inputs", "fit_derived_model", "split_records"]

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


def _derived_columns(split: Any, derived: Sequence[str]) -> np.ndarray:
    meta = getattr(split, "metadata", None)
    lacking = [c for c in derived if meta is None or c not in meta.columns]
    if lacking:
        raise ConfigError(f"derived feature '{lacking[0]}' is not a metadata column of the "
                          f"{split.name} split")
    return meta[list(derived)].to_numpy(dtype=np.float64)


DERIVED_MODEL = "derived_model.onnx"


@contextmanager
def _onnx_bool_ints() -> Iterator[None]:
    """skl2onnx 1.20 writes a tree ensemble's missing-value flags as Python bools inside an
    integer-list attribute, which protobuf ≥ 5 refuses ("Expected an int, got a boolean");
    during the conversion only, such bools are written as the 0/1 they mean."""
    import onnx.helper

    original = onnx.helper.make_attribute

    def make_attribute(key: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(value, list | tuple) and any(isinstance(v, bool | np.bool_) for v in value):
            value = [int(v) if isinstance(v, bool | np.bool_) else v for v in value]
        return original(key, value, *args, **kwargs)

    onnx.helper.make_attribute = make_attribute
    try:
        yield
    finally:
        onnx.helper.make_attribute = original


def fit_derived_model(package: ModelPackage, bundle: Any, derived: Sequence[str],
                      seed: int = 0) -> dict[str, Any] | None:
    """Train a gradient-boosted classifier on the *train* split's derived features, write it
    into the package as ONNX and return the card fields naming it (None: no train split).

    The train split is the one the network learnt from, so calib stays unseen by both models
    and the fusion fitted on it compares them fairly (stacking). Why boosting and not the
    features straight into the logistic fusion: on PhysioNet 2017 the features alone reach a
    challenge F1 of 0.80 with boosting, and repeated CV inside calib preferred the stacked model
    (0.839) to the linear one (0.818; benchmarks/results/physionet2017_rr.md).
    """
    from skl2onnx import to_onnx
    from sklearn.ensemble import HistGradientBoostingClassifier

    from meddx.inference.derived import DerivedModel

    train = bundle.splits.get("train")
    if train is None or len(train) == 0:
        return None
    task = package.card.task
    x = _derived_columns(train, derived)
    y = task.target_index(np.asarray(train.targets))
    start = time.perf_counter()
    gbm = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, random_state=seed)
    gbm.fit(x, y)
    if len(gbm.classes_) != len(task.class_names):
        raise EvaluationError("the train split lacks a class: the derived-feature model "
                              "cannot be fitted")
    with _onnx_bool_ints():
        onx = to_onnx(gbm, x[:1].astype(np.float32), options={id(gbm): {"zipmap": False}},
                      target_opset={"": 17, "ai.onnx.ml": 3})
    # the copy must answer as the original: ONNX compares float32 features with float32
    # thresholds, so a value within rounding of a threshold may take the other branch (0.4% of
    # PhysioNet 2017's records by more than 0.001); more than that is an error
    p = np.exp(DerivedModel(model=onx.SerializeToString()).log_proba(x[:1000]))
    q = gbm.predict_proba(x[:1000])
    if (np.abs(p - q).max(axis=1) > 1e-3).mean() > 0.02 or (p.argmax(1) != q.argmax(1)).mean() > 0.01:
        raise EvaluationError("the ONNX copy of the derived-feature model disagrees with it")
    (package.path / DERIVED_MODEL).write_bytes(onx.SerializeToString())
    package.add_file(DERIVED_MODEL)
    logger.info("derived-feature model: %d trees on %d train cases in %.1f s",
                gbm.n_iter_ * (1 if len(gbm.classes_) == 2 else len(gbm.classes_)), len(y),
                time.perf_counter() - start)
    return {"derived_model": DERIVED_MODEL,
            "derived_outputs": [f"derived-model:log p({n})" for n in task.class_names],
            "derived_model_info": {"kind": "HistGradientBoostingClassifier (scikit-learn), "
                                           "ONNX via skl2onnx",
                                   "fitted_on": "train", "n_fit": int(len(y)),
                                   "iterations": int(gbm.n_iter_), "learning_rate": 0.05,
                                   "seed": seed}}


def fit_side_inputs(package: ModelPackage, bundle: Any, inputs: Sequence[SideInput],
                    c: float = 1.0, derived: Sequence[str] = (), seed: int = 0
                    ) -> SideInputFusion:
    """Fit the late fusion on ``bundle``'s calib split and write it into the card.

    Args:
        package: the trained package (its card is rewritten).
        bundle: the DataBundle it was trained on; its calib split must carry the inputs as
            metadata columns.
        inputs: the side inputs (:attr:`meddx.config.ExperimentConfig.side_inputs`).
        c: inverse L2 strength of the logistic model (scikit-learn's ``C``).
        derived: metadata columns the modality derived from each input (the ECG's
            ``rhythm:*`` features; ``bundle.input_spec["derived_features"]``): a boosted model
            of them is trained on the train split (:func:`fit_derived_model`) and its class
            log-probabilities are fused.
        seed: the boosted model's seed.

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
    targets = np.asarray(calib.targets)
    # a binary network's one logit is the positive class's log-odds: fit on "is positive"
    y = (targets.astype(int).reshape(-1) == 1).astype(int) if task.num_outputs == 1 \
        else task.target_index(targets)
    if len(np.unique(y)) != len(task.class_names):
        raise EvaluationError("the calibration split lacks a class: side inputs cannot be fitted")
    values = parse_records(inputs, split_records(calib, inputs))
    fitted = _standardised(inputs, values)
    logits, _ = Predictor(package, backend="torch").predict_split(calib, fused=False)
    names = ([task.positive_class or "positive"] if task.num_outputs == 1
             else list(task.class_names))
    extra: dict[str, Any] = {}
    x_derived = None
    if derived:
        x_derived = _derived_columns(calib, derived)
        model = fit_derived_model(package, bundle, derived, seed=seed)
        if model is not None:
            from meddx.inference.derived import DerivedModel

            x_derived = DerivedModel(package.path / model["derived_model"]).log_proba(x_derived)
            extra.update(model)
        fill = np.nanmedian(np.where(np.isfinite(x_derived), x_derived, np.nan), axis=0)
        fill = np.where(np.isfinite(fill), fill, 0.0)
        filled = np.where(np.isfinite(x_derived), x_derived, fill)
        std = filled.std(axis=0)
        extra.update({"derived": list(derived), "derived_fill": fill.tolist(),
                      "derived_mean": filled.mean(axis=0).tolist(),
                      "derived_std": np.where(std > 0, std, 1.0).tolist()})
    fusion = SideInputFusion(inputs=fitted, image_features=[f"logit:{n}" for n in names],
                             coef=[[0.0]], intercept=[0.0], **extra)
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
