"""ONNX export, static INT8 quantisation, and the onnxruntime backend of the Predictor.

``export_onnx(package)`` writes ``model.onnx`` (fp32, dynamic batch, checked against torch) into
the package; with ``int8=True`` it also writes ``model.int8.onnx``, statically quantised (QDQ,
per-channel weights) with onnxruntime.quantization, calibrated on images from the **training**
split, and reports the accuracy change on the test split in ``card.metrics["quantization"]``.
The fp32 safetensors weights stay in the package: Grad-CAM always uses them.

:class:`OnnxBackend` is what :class:`meddx.inference.Predictor` uses when ``model.onnx`` is
present: ``logits(batch) -> np.ndarray``, like the torch path. A package with a Mahalanobis
OOD detector is exported with a second output, ``features`` (the input of the layer the
detector reads), so the ONNX backend flags the same inputs as torch.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddx.errors import ConfigError, ModelError
from meddx.package import ModelPackage, load_package

__all__ = ["OnnxBackend", "export_onnx", "ONNX_FILE", "INT8_FILE"]

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
_VARIANTS = {"fp32": ONNX_FILE, "int8": INT8_FILE}


class OnnxBackend:
    """onnxruntime inference for a package's exported network.

    Args:
        package: the loaded package (its manifest has verified the ONNX file's sha256).
        variant: ``fp32`` (``model.onnx``) or ``int8`` (``model.int8.onnx``); default from
            ``$MEDDX_ONNX_VARIANT``, else fp32.
        threads: intra-op threads (default: torch's current setting).
    """

    def __init__(self, package: ModelPackage, variant: str | None = None,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        variant = variant or os.environ.get("MEDDX_ONNX_VARIANT", "fp32")
        if variant not in _VARIANTS:
            raise ConfigError(f"unknown ONNX variant '{variant}'; choose fp32 or int8")
        name = _VARIANTS[variant]
        path = package.path / name
        if name not in package.manifest or not path.is_file():
            raise ModelError(f"package has no {name}", path=str(package.path),
                             hint="run `meddx export MODEL --onnx" +
                                  (" --int8`" if variant == "int8" else "`"))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.variant = variant
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.has_features = "features" in [o.name for o in self.session.get_outputs()]

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw outputs for a model-ready float32 batch."""
        return self.outputs(batch)[0]

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and the ``features`` output (None when the export has none)."""
        x = np.ascontiguousarray(np.asarray(batch, dtype=np.float32))
        out = self.session.run(None, {self.input_name: x})
        return out[0], (out[1] if self.has_features and len(out) > 1 else None)


# -------------------------------------------------------------------- export
def _example(package: ModelPackage, batch: int) -> torch.Tensor:
    from meddx.modalities import get_modality
    from meddx.models import MODELS

    builder = MODELS.get(package.card.network["name"])
    spec = get_modality(package.card.modality).network_spec(package.card.preprocessing)
    x = builder.example_input(spec, batch)
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"network '{package.card.network['name']}' takes structured inputs; "
                          "ONNX export supports tensor-input networks only")
    return x.float()


class _WithFeatures(torch.nn.Module):
    """The network returning ``(logits, features)``: the input of its OOD layer as well."""

    def __init__(self, model: torch.nn.Module, layer: str) -> None:
        super().__init__()
        self.model = model
        self._features: list[torch.Tensor] = []  # a list: no tensor attribute set in export
        dict(model.named_modules())[layer].register_forward_hook(self._keep)

    def _keep(self, module: torch.nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        self._features.append(inputs[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(x)
        return out, self._features.pop().reshape(out.shape[0], -1)


def _export_fp32(model: torch.nn.Module, x: torch.Tensor, out: Path, opset: int,
                 features_layer: str | None = None) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    names = ["logits"]
    if features_layer is not None:
        # a new module starts in training mode: eval, as the network it wraps
        model, names = _WithFeatures(model, features_layer).eval(), ["logits", "features"]
    torch.onnx.export(model, (x,), str(out), dynamo=True, external_data=False,
                      input_names=["input"], output_names=names, opset_version=opset,
                      dynamic_shapes=({0: batch},), verbose=False)


def _check(model: torch.nn.Module, path: Path, x: torch.Tensor, atol: float,
           rtol: float) -> float:
    """Largest |onnx − torch| logit difference; an error where one exceeds
    ``atol + rtol·|torch|`` (numpy's allclose rule: the example input is noise, whose logits
    can be large, and fp32 kernels differ in summation order between CPUs)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        want = model(x).float().numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    err = np.abs(got - want)
    diff = float(np.max(err))
    if np.any(err > atol + rtol * np.abs(want)):
        worst = int(np.argmax(err - rtol * np.abs(want)))
        raise ModelError(f"ONNX output differs from torch by {diff:.2e} "
                         f"(> {atol:g} + {rtol:g}·|logit|, logit {want.flat[worst]:.3g})",
                         path=str(path))
    return diff


class _Reader:
    """onnxruntime CalibrationDataReader over training-split batches."""

    def __init__(self, batches: list[np.ndarray], input_name: str) -> None:
        self._it = iter([{input_name: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _split_arrays(package: ModelPackage, split: str, limit: int | None,
                  bundle: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Model-ready inputs (N, …) and targets of a split of the training dataset."""
    from meddx.modalities import get_modality
    from meddx.modalities.loading import load_bundle

    if bundle is None:
        config = package.card.training.get("config")
        if not config:
            raise ConfigError("the card does not record its training config; cannot find the "
                              "training data for calibration")
        bundle = load_bundle(config)
    s = bundle.split(split)
    modality = get_modality(package.card.modality)
    n = len(s) if limit is None else min(limit, len(s))
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(len(s), size=n, replace=False)) if n < len(s) else np.arange(n)
    xs = [np.asarray(modality.item_tensor(s.inputs[i], package.card.preprocessing),
                     dtype=np.float32) for i in idx]
    return np.stack(xs), np.asarray(s.targets)[idx]


def _quantize(fp32: Path, out: Path, calib: np.ndarray, batch: int) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        batches = [calib[i: i + batch] for i in range(0, len(calib), batch)]
        quantize_static(str(pre), str(out), _Reader(batches, "input"),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)


def _scores(package: ModelPackage, logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    task = package.card.task
    probs = task.probabilities(torch.from_numpy(np.asarray(logits, np.float32))).numpy()
    out: dict[str, float] = {}
    if task.kind in ("binary", "multiclass", "ordinal"):
        y = task.target_index(targets)
        out["accuracy"] = float(np.mean(probs.argmax(1) == y))
        if task.kind == "binary" and len(set(y.tolist())) == 2:
            from sklearn.metrics import roc_auc_score

            out["auroc"] = float(roc_auc_score(y == task.positive_index,
                                               probs[:, task.positive_index]))
    return out


def _compare(package: ModelPackage, model: torch.nn.Module, int8: Path, x: np.ndarray,
             y: np.ndarray) -> dict[str, Any]:
    with torch.inference_mode():
        ref = np.concatenate([model(torch.from_numpy(x[i: i + 256])).float().numpy()
                              for i in range(0, len(x), 256)])
    import onnxruntime as ort

    sess = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    q = np.concatenate([sess.run(None, {"input": x[i: i + 256]})[0]
                        for i in range(0, len(x), 256)])
    fp32, i8 = _scores(package, ref, y), _scores(package, q, y)
    agree = float(np.mean(ref.argmax(1) == q.argmax(1))) if ref.shape[1] > 1 else \
        float(np.mean((ref[:, 0] > 0) == (q[:, 0] > 0)))
    return {"split": "test", "n": int(len(y)), "fp32": fp32, "int8": i8,
            "change": {k: i8[k] - fp32[k] for k in fp32 if k in i8},
            "decision_agreement": agree,
            "max_abs_logit_diff": float(np.max(np.abs(ref - q)))}


def export_onnx(path: str | Path | ModelPackage, *, int8: bool = False, opset: int = 18,
                calib_samples: int = 256, atol: float = 1e-3, rtol: float = 1e-3,
                bundle: Any = None) -> dict[str, Any]:
    """Write ``model.onnx`` (and with ``int8`` ``model.int8.onnx``) into a package.

    Args:
        path: the package folder or a loaded package.
        int8: also write the statically quantised INT8 variant.
        opset: ONNX opset.
        calib_samples: training-split inputs used to calibrate the quantisation ranges.
        atol, rtol: the fp32 export is accepted where every |onnx − torch| logit difference
            is at most ``atol + rtol·|torch logit|``.
        bundle: an already loaded DataBundle of the training dataset (else loaded from the
            card's training config).

    Returns:
        A report: files written, export check, and (int8) the test-split accuracy change.
    """
    package = path if isinstance(path, ModelPackage) else load_package(path)
    model = package.build_model().float().eval()
    with torch.random.fork_rng():  # a fixed example: the same check on every run
        torch.manual_seed(0)
        x = _example(package, 2)
    out = package.path / ONNX_FILE
    start = time.perf_counter()
    ood = package.card.ood
    layer = ood.layer if ood is not None and ood.method == "mahalanobis" else None
    _export_fp32(model, x, out, opset, layer)
    model = package.build_model().float().eval()  # without the export's hook
    report: dict[str, Any] = {"files": [ONNX_FILE], "opset": opset,
                              "max_abs_diff_fp32": _check(model, out, x, atol, rtol),
                              "export_s": round(time.perf_counter() - start, 2)}
    if int8:
        if bundle is None:
            from meddx.modalities.loading import load_bundle

            bundle = load_bundle(package.card.training.get("config") or {})
        calib, _ = _split_arrays(package, "train", calib_samples, bundle)
        _quantize(out, package.path / INT8_FILE, calib, batch=32)
        report["files"].append(INT8_FILE)
        report["calibration"] = {"split": "train", "n": int(len(calib))}
        if "test" in bundle.splits:
            xt, yt = _split_arrays(package, "test", None, bundle)
            report["int8_vs_fp32"] = _compare(package, model, package.path / INT8_FILE, xt, yt)
    metrics = dict(package.card.metrics)
    if int8:
        metrics["quantization"] = {k: report[k] for k in ("calibration", "int8_vs_fp32")
                                   if k in report}
    package.update_card(metrics=metrics)  # rewrites card + manifest (lists the new files)
    logger.info("exported %s to %s", package.card.name, ", ".join(report["files"]))
    return report
