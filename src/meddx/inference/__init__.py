"""Prediction from a ModelPackage: read → preprocess → network → calibrate → decide → set.

``load_model(path)`` verifies the package and returns a :class:`Predictor`. The torch backend
runs the fp32 weights (bf16 autocast where the CPU has AMX); when the package holds
``model.onnx`` and onnxruntime is installed, the ONNX backend is used instead. Grad-CAM always
uses the fp32 torch weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddx.errors import ConfigError, DataError, MeddxError
from meddx.inference.derived import DerivedModel
from meddx.inference.ood import FeatureTap, load_detector
from meddx.inference.prediction import Prediction
from meddx.modalities import Sample, get_modality
from meddx.package import ModelPackage, load_package
from meddx.sideinputs import note, parse_records
from meddx.statistics.calibration import apply_temperature
from meddx.statistics.conformal import prediction_sets

__all__ = ["Predictor", "Prediction", "load_model", "amx_available", "choose_operating_point",
           "attach_side_inputs", "BACKENDS"]

BACKENDS = ("auto", "torch", "onnx", "onnx-int8")
# sample metadata that FHIR answers are built from: passed on whatever its size
ALWAYS_NOTES = ("basis", "patient", "encounter", "hours_used", "ignored")
# sample metadata keys holding side inputs (the raw record, where it came from): never echoed
SIDE_KEYS = ("side_inputs", "side_inputs_source")
# sample metadata key of the features a modality derives from the input (ECG rhythm features)
DERIVED_KEY = "derived"

logger = logging.getLogger(__name__)


def amx_available() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16), where autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def load_model(path: str | Path, backend: str = "auto", threads: int | None = None,
               operating_point: str | None = None) -> Predictor:
    """Load and verify a package (sha256, no pickle) and return its Predictor.

    Args:
        path: the package folder (``runs/x/model``).
        backend: "auto" (ONNX when present, else torch), "torch", or "onnx".
        threads: intra-op threads (default: torch's).
        operating_point: the decision rule of this deployment, a name from the card's
            operating points (default: the card's default).
    """
    if threads:
        torch.set_num_threads(threads)
    return Predictor(load_package(path), backend=backend, operating_point=operating_point)


def choose_operating_point(card: Any, name: str | None) -> str | None:
    """The operating point a deployment decides at: ``name`` or the card's default.

    Raises:
        ConfigError: ``name`` is not one of the card's operating points (the message lists
            them).
    """
    if name is None:
        return str(card.default_operating_point) if card.default_operating_point else None
    points = list(card.operating_points)
    if name not in points:
        from meddx.registry import suggest

        have = ", ".join(points) if points else "none (the task has no positive class to " \
            "decide on, or the calibration split lacked a class)"
        raise ConfigError(f"model '{card.name}' has no operating point '{name}'"
                          + (suggest(name, points) if points else ""),
                          hint=f"its card's operating points: {have}")
    return name


class Predictor:
    """Runs one package on user inputs.

    Args:
        package: the loaded package.
        backend: ``auto`` | ``torch`` | ``onnx`` | ``onnx-int8``.
        bf16: bf16 autocast (default: where the CPU has AMX).
        operating_point: decide at this operating point of the card instead of its default
            (per deployment: ``meddx predict/serve --operating-point NAME``).

    Attributes:
        package, card, task, modality, model (fp32 torch module), backend ("torch" | "onnx"),
        operating_point_name (the decision rule in use; None: no decision).
    """

    def __init__(self, package: ModelPackage, backend: str = "auto", bf16: bool | None = None,
                 operating_point: str | None = None):
        self.package = package
        self.card = package.card
        self.task = package.card.task
        self.operating_point_name = choose_operating_point(self.card, operating_point)
        self.modality = get_modality(package.card.modality)
        self.model = package.build_model()
        self.bf16 = amx_available() if bf16 is None else bf16
        self._onnx = None
        self._explainer = None
        self._derived: DerivedModel | None = None  # the card's derived-feature model, at first use
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
        if backend != "torch" and package.onnx_path is not None:
            try:
                from meddx.inference.onnx import OnnxBackend

                variant = "int8" if backend == "onnx-int8" else None
                self._onnx = OnnxBackend(package, variant=variant)
            except ImportError as e:
                if backend != "auto":
                    raise ConfigError("the onnx backend needs onnxruntime: "
                                      "pip install 'meddx[serve]'") from e
        elif backend != "auto" and backend != "torch":
            raise ConfigError("package has no model.onnx", hint="run `meddx export MODEL --onnx`")
        self.backend = backend if self._onnx is not None and backend != "auto" else (
            "onnx" if self._onnx is not None else "torch")
        self.detector = load_detector(package)
        self._tap = None
        if self.detector is not None and self.detector.needs_features:
            layers = dict(self.model.named_modules())
            if self.detector.spec.layer not in layers:
                raise ConfigError(f"the card's OOD layer {self.detector.spec.layer!r} is not in "
                                  "the network")
            self._tap = FeatureTap(layers[self.detector.spec.layer], str(self.detector.spec.layer))

    @property
    def operating_point(self) -> Any:
        """The :class:`~meddx.package.OperatingPoint` decisions are made at (None: none)."""
        name = self.operating_point_name
        return None if name is None else self.card.operating_points.get(name)

    def use_operating_point(self, name: str | None) -> None:
        """Decide at the card's operating point ``name`` from now on (None: the default).

        Raises:
            ConfigError: the card has no such operating point.
        """
        self.operating_point_name = choose_operating_point(self.card, name)

    # ----------------------------------------------------------------- logits
    def logits(self, batch: Any) -> np.ndarray:
        """Raw network outputs for a model-ready batch (tensor, or a modality's batch object)."""
        return self.forward(batch)[0]

    @torch.inference_mode()
    def forward(self, batch: Any, features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and, with ``features`` and a Mahalanobis detector, the features it scores.

        The ONNX backend reads the features from the export's second output; an export
        without one (made before the package had a detector) falls back to a torch pass.
        """
        want = features and self._tap is not None
        if self._onnx is not None and isinstance(batch, torch.Tensor | np.ndarray):
            z, f = self._onnx.outputs(np.asarray(batch, dtype=np.float32))
            if not want or f is not None:
                return z, f if want else None
            return z, self._torch_forward(batch, True)[1]
        return self._torch_forward(batch, want)

    def _torch_forward(self, batch: Any, want: bool) -> tuple[np.ndarray, np.ndarray | None]:
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(batch)
        if self._tap is not None:
            self._tap.reset()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(batch)
        f = self._tap.pop() if self._tap is not None else None
        return out.float().numpy(), f if want else None

    def watch_features(self, layer: str) -> None:
        """Read the input of ``layer`` on every forward (fitting a detector on this network)."""
        if self._tap is not None:
            self._tap.remove()
        self._tap = FeatureTap(dict(self.model.named_modules())[layer], layer)

    def ood_scores(self, logits: np.ndarray, features: np.ndarray | None) -> np.ndarray | None:
        """The detector's scores (higher: less like the training data); None without one."""
        if self.detector is None:
            return None
        return self.detector.scores(logits, features)

    def predict_split(self, split: Any, batch_size: int = 256, progress: bool = False,
                      fused: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Logits and raw probabilities for every sample of a :class:`Split` (a windowed
        record, ECG: the mean of its windows' logits, as in prediction).

        With side inputs in the card (and ``fused``), the logits are fused with the split's
        metadata; a split without it (ISIC 2017's test set) has every side input missing,
        flagged as such in the fusion and said in a warning.
        """
        z = (self.record_logits(split, progress) if self.windowed
             else self.split_outputs(split, batch_size, progress)[0])
        if fused:
            z = self.fuse_split(z, split)
        return z, self.task.probabilities(torch.from_numpy(z)).numpy()

    @property
    def windowed(self) -> bool:
        """Whether a record is read as overlapping windows (ECG) whose logits are averaged."""
        spec = self.card.preprocessing
        return bool(spec.get("stride")) and hasattr(self.modality, "windows_of") \
            and hasattr(self.modality, "aggregate_logits")

    def record_logits(self, split: Any, progress: bool = False) -> np.ndarray:
        """Unfused logits of every record of a windowed split as ``meddx predict`` sees it:
        the whole record cut into windows, their logits averaged — so calibration, operating
        points, conformal sets and evaluation rest on the same numbers as a prediction."""
        spec = self.card.preprocessing
        it: Iterable[Any] = split.inputs
        if progress:
            from tqdm import tqdm

            it = tqdm(split.inputs, desc=f"predict {split.name}", unit="record")
        modality: Any = self.modality  # a windowed modality (checked by `windowed`)
        rows = [modality.aggregate_logits(self.logits(modality.windows_of(x, spec)), self.task)
                for x in it]
        return (np.stack(rows).astype(np.float32) if rows
                else np.zeros((0, self.task.num_outputs), np.float32))

    def fuse_split(self, logits: np.ndarray, split: Any) -> np.ndarray:
        """``logits`` of every sample of ``split`` fused with the split's side inputs when the
        card has them (unchanged otherwise); the OOD detector scores the unfused outputs."""
        fusion = self.card.side_inputs
        if fusion is None:
            return logits
        return fusion.fuse(logits, _split_values(split, fusion),
                           self.derived_block(_split_derived(split, fusion)))

    def split_outputs(self, split: Any, batch_size: int = 256, progress: bool = False,
                      features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and (with ``features``) the detector's features of every sample of a split."""
        from torch.utils.data import DataLoader

        from meddx.modalities.base import SplitDataset

        ds = SplitDataset(self.modality, split, self.card.preprocessing, transform=None)
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=self.modality.collate)
        outs, feats = [], []
        it: Iterable[Any] = loader
        if progress:
            from tqdm import tqdm

            it = tqdm(loader, desc=f"predict {split.name}", unit="batch")
        for x, _ in it:
            z, f = self.forward(x, features)
            outs.append(z)
            feats.append(f)
        z = np.concatenate(outs) if outs else np.zeros((0, self.task.num_outputs), np.float32)
        if not features or not feats or any(f is None for f in feats):
            return z, None
        return z, np.concatenate([f for f in feats if f is not None])

    # ---------------------------------------------------------------- predict
    def read(self, source: Any) -> Sample:
        """Read and preprocess one input as training did."""
        return self.modality.read(source, self.card.preprocessing)

    def predict(self, inputs: Sequence[Any] | Any, explain: bool = False,
                batch_size: int = 64, ids: Sequence[str] | None = None,
                side_inputs: Sequence[Mapping[str, Any] | None] | None = None
                ) -> list[Prediction]:
        """Predict for paths, arrays, tensors, strings or FHIR resources.

        Args:
            side_inputs: per input, its side inputs (``{"age": 55, "sex": "female"}``; None
                or a left-out key: missing) for a package that takes them (card
                ``side_inputs``).

        Raises:
            DataError / InputMismatchError: an input cannot be read or does not fit the model;
                side inputs the model does not take, or a bad value.
        """
        if isinstance(inputs, str | Path | np.ndarray | torch.Tensor | dict) or not isinstance(inputs, Sequence):
            inputs = [inputs]
        if side_inputs is not None and len(side_inputs) != len(inputs):
            raise DataError(f"{len(side_inputs)} side-input records for {len(inputs)} inputs",
                            hint="give one record (or None) per input")
        samples = []
        for i, src in enumerate(inputs):
            s = self.read(src)
            if ids is not None:
                s.id = ids[i]
            elif not s.id:
                s.id = str(i)
            if side_inputs is not None:
                attach_side_inputs(s, side_inputs[i], "argument")
            samples.append(s)
        return self.predict_samples(samples, explain=explain, batch_size=batch_size)

    def predict_samples(self, samples: list[Sample], explain: bool = False,
                        batch_size: int = 64) -> list[Prediction]:
        """Predict for already-read samples (windows aggregated when the modality has them)."""
        logits, scores = self._sample_logits(samples, batch_size)
        logits, side_notes = self._fuse(logits, samples)
        preds = self.finalize(logits, [s.id for s in samples], ood_scores=scores)
        for p, s, side in zip(preds, samples, side_notes, strict=True):
            p.notes.update({k: v for k, v in s.meta.items()
                            if (k in ALWAYS_NOTES or _small_json(v))
                            and k not in SIDE_KEYS and k != DERIVED_KEY})
            if side is not None:
                p.notes["side_inputs"] = side
        if explain:
            self._explain(samples, preds)
        return preds

    def _fuse(self, logits: np.ndarray, samples: list[Sample]
              ) -> tuple[np.ndarray, list[dict[str, Any] | None]]:
        """Fused logits and per-sample notes (values used, missing ones, source) when the card
        has side inputs; unchanged logits otherwise.

        Raises:
            DataError: side inputs for a model without them, an unknown name or a bad value.
        """
        fusion = self.card.side_inputs
        given = [s.meta.get(SIDE_KEYS[0]) for s in samples]
        if fusion is None:
            if any(g is not None for g in given):
                raise DataError(f"model '{self.card.name}' takes no side inputs",
                                hint="send the input alone; its card lists what it expects")
            return logits, [None] * len(samples)
        values = parse_records(fusion.inputs, given, strict=True)
        notes: list[dict[str, Any] | None] = [
            note(fusion.inputs, v, str(s.meta.get(SIDE_KEYS[1]) or "none given"))
            if fusion.inputs else None for v, s in zip(values, samples, strict=True)]
        derived = None
        if fusion.derived:
            derived = np.array([[(s.meta.get(DERIVED_KEY) or {}).get(n, np.nan)
                                 for n in fusion.derived] for s in samples], dtype=np.float64)
        return fusion.fuse(logits, values, self.derived_block(derived)), notes

    def derived_block(self, raw: np.ndarray | None) -> np.ndarray | None:
        """The fused block for raw derived features (n, len(derived)): the card's derived
        model's class log-probabilities (ONNX, run here), or the features themselves."""
        fusion = self.card.side_inputs
        if raw is None or fusion is None or not fusion.derived_model:
            return raw
        if self._derived is None:
            self._derived = DerivedModel(self.package.path / fusion.derived_model)
        return self._derived.log_proba(raw)

    def _sample_logits(self, samples: list[Sample], batch_size: int
                       ) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and OOD scores (None without a detector); windowed records (ECG) get the
        mean of their windows' scores."""
        aggregate = getattr(self.modality, "aggregate_logits", None)
        feats = self.detector is not None
        if any(s.meta.get("windows") for s in samples) and aggregate is not None:
            rows, scores = [], []
            for s in samples:
                z, f = self.forward(s.tensor, feats)
                rows.append(aggregate(z, task=self.task))
                s_ood = self.ood_scores(z, f) if feats else None
                if s_ood is not None:
                    scores.append(float(np.mean(s_ood)))
            return np.stack(rows), np.asarray(scores) if feats else None
        outs, score_parts = [], []
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            items = [(s.tensor, torch.zeros(())) for s in chunk]
            try:
                x, _ = self.modality.collate(items)
            except RuntimeError as e:
                raise DataError("inputs in one batch have different shapes after preprocessing",
                                hint="check the inputs against the model's expected size") from e
            z, f = self.forward(x, feats)
            outs.append(z)
            part = self.ood_scores(z, f) if feats else None
            if part is not None:
                score_parts.append(part)
        return np.concatenate(outs), np.concatenate(score_parts) if score_parts else None

    def finalize(self, logits: np.ndarray, ids: Sequence[str],
                 ood_scores: np.ndarray | None = None) -> list[Prediction]:
        """Turn logits into Predictions: probabilities, calibration, decision, conformal set,
        and (with ``ood_scores``) the out-of-distribution flag: a flagged input gets no
        decision at the operating point."""
        task, card = self.task, self.card
        probs = task.probabilities(torch.from_numpy(np.asarray(logits, np.float32))).numpy()
        cal = None
        if card.calibration is not None:
            cal = apply_temperature(task, logits, card.calibration.temperature)
        basis = cal if cal is not None else probs
        sets = None
        if card.conformal is not None and task.kind != "regression":
            if task.kind == "multilabel":
                q = np.asarray(card.conformal.threshold, dtype=float)
                both = np.stack([1 - basis, basis], axis=2)
                sets = np.stack([prediction_sets(both[:, j], card.conformal.method, q[j])
                                 for j in range(basis.shape[1])], axis=1)
            else:
                q0 = card.conformal.threshold
                sets = prediction_sets(basis, card.conformal.method,
                                       float(q0[0] if isinstance(q0, list) else q0))
        model_info = {"name": card.name, "version": card.version, "sha256": self.package.sha256}
        if task.positive_class:
            model_info["positive_class"] = task.positive_class
        preds = [self._one(i, ids[i], probs[i], None if cal is None else cal[i],
                           None if sets is None else sets[i], model_info)
                 for i in range(len(ids))]
        if ood_scores is not None and self.detector is not None:
            for p, score, flag in zip(preds, ood_scores, self.detector.flags(ood_scores),
                                      strict=True):
                p.ood, p.ood_score = bool(flag), float(score)
                if flag:  # outside what the model knows: no recommendation
                    p.decision, p.operating_point, p.threshold, p.review = None, None, None, False
        return preds

    def _one(self, i: int, sid: str, p: np.ndarray, c: np.ndarray | None, s: np.ndarray | None,
             model_info: dict[str, str]) -> Prediction:
        task = self.task
        names = task.class_names
        basis = c if c is not None else p
        pred = Prediction(
            id=str(sid),
            probabilities={n: float(v) for n, v in zip(names, p, strict=True)},
            label=names[int(np.argmax(p))],
            calibrated=None if c is None else {n: float(v) for n, v in zip(names, c, strict=True)},
            model=dict(model_info),
        )
        if task.kind == "regression":
            pred.label = float(p[0])
            return pred
        if task.kind == "multilabel":
            pred.label = [n for n, v in zip(names, p, strict=True) if v >= 0.5]
            if s is not None:
                pred.label_sets = {
                    n: [lab for lab, keep in zip(("absent", "present"), s[j], strict=True) if keep]
                    for j, n in enumerate(names)
                }
                pred.refer = any(len(v) != 1 for v in pred.label_sets.values())
            return pred
        op = self.operating_point
        if op is not None and op.positive_class in names:
            k = names.index(op.positive_class)
            positive = bool(basis[k] >= op.threshold)
            pred.decision = op.positive_class if positive else f"not {op.positive_class}"
            pred.operating_point = self.operating_point_name
            pred.threshold = op.threshold
        if s is not None:
            pred.prediction_set = [n for n, keep in zip(names, s, strict=True) if keep]
            pred.refer = len(pred.prediction_set) != 1
            if pred.decision is not None and op is not None and len(pred.prediction_set) == 1:
                only = pred.prediction_set[0]
                said_positive = pred.decision == op.positive_class
                pred.review = said_positive != (only == op.positive_class)
        return pred

    def explainer(self) -> Any:
        """The modality's explainer for this model, built once (it hooks the fp32 network)."""
        if self._explainer is None:
            from meddx.models.explain import combined_explainer

            # an ensemble or TTA package: the mean of the members' maps over every view
            self._explainer = combined_explainer(
                self.modality, self.model, self.card.preprocessing, task=self.task,
                network=self.card.network.get("name"))
        return self._explainer

    def _explain(self, samples: list[Sample], preds: list[Prediction]) -> None:
        try:
            explainer = self.explainer()
        except MeddxError as e:
            logger.warning("no explanation: %s", e)
            return
        names = self.task.class_names
        for s, p in zip(samples, preds, strict=True):
            target = p.decision if isinstance(p.decision, str) and p.decision in names else p.label
            index = names.index(target) if isinstance(target, str) and target in names else 0
            p.explanation = explainer.explain(s, index)


def _split_values(split: Any, fusion: Any) -> list[dict[str, Any]]:
    """Checked side-input values of every case of a split, from its metadata."""
    meta = getattr(split, "metadata", None)
    if meta is None or len(meta.columns) == 0:
        logger.warning("the %s split carries no metadata: side inputs %s all missing",
                       split.name, [s.name for s in fusion.inputs])
        records: list[Any] = [None] * len(split)
    else:
        records = meta.reset_index(drop=True).to_dict("records")
    return parse_records(fusion.inputs, records)


def _split_derived(split: Any, fusion: Any) -> np.ndarray | None:
    """The derived features of every case of a split (its metadata columns), or None."""
    if not fusion.derived:
        return None
    meta = getattr(split, "metadata", None)
    missing = [c for c in fusion.derived if meta is None or c not in meta.columns]
    if meta is None or missing:
        logger.warning("the %s split lacks %d derived feature(s) (%s…): calib medians used",
                       split.name, len(missing), missing[0])
        return None
    values: np.ndarray = meta[list(fusion.derived)].to_numpy(dtype=np.float64)
    return values


def attach_side_inputs(sample: Sample, record: Mapping[str, Any] | None, source: str) -> None:
    """Give a read sample its side inputs (``record``; None: none known) and say where they
    came from (``"csv"``, ``"request body"``, ``"FHIR Patient"``) for the prediction's notes."""
    sample.meta[SIDE_KEYS[0]] = record if record is not None else {}
    sample.meta[SIDE_KEYS[1]] = source


def _small_json(value: Any) -> bool:
    """Sample metadata worth passing on as prediction notes (JSON-able, not bulky)."""
    import json

    try:
        return len(json.dumps(value)) < 20_000
    except (TypeError, ValueError):
        return False
