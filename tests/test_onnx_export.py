"""ONNX export (fp32 + static INT8 calibrated on the training split) and the onnxruntime backend."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from meddx.errors import ConfigError, ModelError
from meddx.inference import load_model
from meddx.inference.onnx import INT8_FILE, ONNX_FILE, OnnxBackend, export_onnx
from meddx.package import load_package
from serving_support import get_package


@pytest.fixture(scope="module")
def package(request):
    return get_package(request)


@pytest.fixture(scope="module")
def exported(package, tmp_path_factory):
    """A copy of the tiny package with model.onnx and model.int8.onnx."""
    folder = tmp_path_factory.mktemp("onnx") / "model"
    shutil.copytree(package.path, folder)
    report = export_onnx(folder, int8=True, calib_samples=64)
    return folder, report


@pytest.mark.slow
# the exported graph is the eval-mode network's, wrapper included (dropout off, BN frozen)
@pytest.mark.filterwarnings("error:Exporting a model while it is in training mode")
def test_export_writes_verified_files(exported):
    folder, report = exported
    assert report["files"] == [ONNX_FILE, INT8_FILE]
    assert report["max_abs_diff_fp32"] < 1e-3
    pkg = load_package(folder)  # sha256 of every file checked, the new ones included
    assert ONNX_FILE in pkg.manifest and INT8_FILE in pkg.manifest
    assert pkg.onnx_path is not None


@pytest.mark.slow
def test_int8_report_on_test_split(exported):
    folder, report = exported
    assert report["calibration"] == {"split": "train", "n": 64}
    q = report["int8_vs_fp32"]
    assert q["split"] == "test" and q["n"] > 0
    assert set(q["change"]) >= {"accuracy"}
    assert abs(q["change"]["accuracy"]) <= 0.1 and q["decision_agreement"] >= 0.9
    card = json.loads((folder / "card.json").read_text())
    assert card["metrics"]["quantization"]["int8_vs_fp32"]["n"] == q["n"]


@pytest.mark.slow
def test_predictor_prefers_onnx_and_agrees_with_torch(exported, breast_npz):
    folder, _ = exported
    onnx_p = load_model(folder)
    torch_p = load_model(folder, backend="torch")
    torch_p.bf16 = False
    assert onnx_p.backend == "onnx" and torch_p.backend == "torch"
    with np.load(breast_npz) as d:
        images = d["test_images"][:8]
    a = onnx_p.predict([img for img in images])
    b = torch_p.predict([img for img in images])
    for x, y in zip(a, b, strict=True):
        for k in x.probabilities:
            assert abs(x.probabilities[k] - y.probabilities[k]) < 1e-4
        assert x.decision == y.decision


@pytest.mark.slow
def test_int8_backend_runs(exported):
    folder, _ = exported
    pkg = load_package(folder)
    fp32, int8 = OnnxBackend(pkg, "fp32"), OnnxBackend(pkg, "int8")
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    a, b = fp32.logits(x), int8.logits(x)
    assert a.shape == b.shape == (4, 1)
    assert np.max(np.abs(a - b)) < 0.5


def test_backend_errors(package):
    with pytest.raises(ConfigError):
        OnnxBackend(package, "fp16")
    if package.onnx_path is None:
        with pytest.raises(ModelError, match="meddx export"):
            OnnxBackend(package, "fp32")
