"""Out-of-distribution detection: the scores (known answers), the detector stored in a package,
the flag on answers, old packages without one, and the ONNX backend agreeing with torch."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from meddx.errors import EvaluationError, ModelError
from meddx.inference import Predictor, load_model
from meddx.inference.ood import OOD_FILE, detector_method, head_layer
from meddx.package import load_package
from meddx.statistics.ood import (
    MahalanobisScorer,
    detector_auroc,
    energy_score,
    false_alarm_threshold,
)


# ----------------------------------------------------------------------------- the scores
def test_mahalanobis_known_answer():
    rng = np.random.default_rng(0)
    cov = np.array([[4.0, 0.0], [0.0, 0.25]])
    means = np.array([[0.0, 0.0], [10.0, 0.0]])
    c = rng.integers(0, 2, 20_000)
    f = means[c] + rng.multivariate_normal([0, 0], cov, len(c))
    scorer = MahalanobisScorer().fit(f, c)
    np.testing.assert_allclose(scorer.means_, means, atol=0.05)
    # one unit along the narrow axis is 2 standard deviations: squared distance 4
    got = scorer.score(np.array([[0.0, 1.0], [10.0, 0.0], [2.0, 0.0]]))
    np.testing.assert_allclose(got, [4.0, 0.0, 1.0], atol=0.1)
    # the squared distance of in-distribution points is chi-square with 2 dof: 95% at 5.99
    thr = false_alarm_threshold(scorer.score(f[:2000]), 0.05)
    assert thr == pytest.approx(5.99, rel=0.1)
    fresh = means[c[:5000]] + rng.multivariate_normal([0, 0], cov, 5000)
    assert abs(np.mean(scorer.score(fresh) > thr) - 0.05) < 0.015


def test_false_alarm_threshold_needs_enough_cases():
    assert false_alarm_threshold(np.arange(19.0), 0.05) == 18.0  # ceil(20 × 0.95) = 19th
    with pytest.raises(EvaluationError, match="too few"):
        false_alarm_threshold(np.arange(10.0), 0.05)


def test_energy_score_reads_one_logit_as_a_pair():
    z = np.array([[-3.0], [0.0], [4.0]])
    np.testing.assert_allclose(energy_score(z), -np.logaddexp(0, z[:, 0]))
    np.testing.assert_allclose(energy_score(np.array([[1.0, 1.0]])), [-(1 + np.log(2))])
    assert detector_auroc(np.zeros(5), np.ones(5)) == 1.0


def test_head_layer_and_method_follow_the_network():
    from meddx.models import build_network

    spec = {"spatial_dims": 2, "in_channels": 1, "size": 16}
    net = build_network("resnet18", num_outputs=1, spec=spec).eval()
    assert head_layer(net, 1)[0] == "fc"
    assert detector_method(net, 1, torch.randn(2, 1, 16, 16)) == "mahalanobis"
    from meddx.modalities.ehr.networks import GRUDEnsemble

    ens = GRUDEnsemble(3, 4, 1, members=2, hidden=4).eval()  # batched heads: no nn.Linear
    assert head_layer(ens, 1) is None
    assert detector_method(ens, 1, torch.zeros(2, 5 * 3 + 4 + 1, 6)) == "energy"


# ------------------------------------------------------------------------ in a package
def _noise(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (28, 28)).astype(np.uint8) for _ in range(n)]


def _breast(npz, n: int = 40) -> list[np.ndarray]:
    with np.load(npz) as d:
        return list(d["test_images"][:n])


def test_package_stores_a_detector(tiny_breast_package):
    pkg = tiny_breast_package
    ood = pkg.card.ood
    assert ood is not None and ood.method == "mahalanobis" and ood.layer == "fc"
    assert ood.feature_dim == 512 and ood.fitted_on == "train"
    assert ood.threshold_fitted_on in ("calib", "calib+train") and ood.false_alarm == 0.05
    flagged = ood.calib_flagged * ood.n_calib  # of the scores the threshold was chosen on
    if ood.threshold_scores == "crossfit":
        flagged += ood.crossfit_flagged * ood.n_crossfit
    assert flagged / ood.n_threshold <= 0.05
    assert OOD_FILE in pkg.manifest
    from safetensors import safe_open

    with safe_open(str(pkg.path / OOD_FILE), "np") as f:
        assert set(f.keys()) == {"means", "precision"}
        assert f.get_tensor("precision").shape == (512, 512)


def test_noise_is_flagged_and_gets_no_decision(tiny_breast_package, breast_npz):
    predictor = Predictor(tiny_breast_package, backend="torch")
    noise = predictor.predict(_noise(4))
    assert all(p.ood is True for p in noise)
    assert all(p.decision is None and p.threshold is None for p in noise)
    d = noise[0].to_dict()
    assert d["ood"] is True and d["ood_score"] > tiny_breast_package.card.ood.threshold
    breast = predictor.predict(_breast(breast_npz))
    assert np.mean([p.ood for p in breast]) < 0.25  # in distribution: few false alarms
    kept = [p for p in breast if not p.ood]
    assert kept and all(p.decision is not None and p.ood_score is not None for p in kept)


def test_tampered_detector_is_refused(tiny_breast_package, tmp_path):
    folder = tmp_path / "pkg"
    shutil.copytree(tiny_breast_package.path, folder)
    with (folder / OOD_FILE).open("r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(ModelError, match=OOD_FILE):
        load_package(folder)


def test_old_package_without_detector_keeps_working(tiny_breast_package, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(tiny_breast_package.path, folder)
    (folder / OOD_FILE).unlink()
    card = json.loads((folder / "card.json").read_text())
    del card["ood"]
    (folder / "card.json").write_text(json.dumps(card))
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest[OOD_FILE]
    from meddx.package import sha256_file

    manifest["card.json"] = sha256_file(folder / "card.json")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    p = load_model(folder, backend="torch").predict(_noise(1))[0]
    assert p.ood is None and p.ood_score is None and p.decision is not None
    assert p.to_dict()["ood"] is None


@pytest.mark.slow
def test_onnx_backend_flags_the_same_inputs(tiny_breast_package, breast_npz, tmp_path):
    from meddx.inference.onnx import export_onnx

    folder = tmp_path / "onnx"
    shutil.copytree(tiny_breast_package.path, folder)
    export_onnx(folder)
    inputs = _breast(breast_npz, 30) + _noise(3)
    onnx = load_model(folder, backend="onnx")
    assert onnx.backend == "onnx" and onnx._onnx.has_features
    torch_preds = Predictor(onnx.package, backend="torch", bf16=False).predict(inputs)
    onnx_preds = onnx.predict(inputs)
    assert [p.ood for p in onnx_preds] == [p.ood for p in torch_preds]
    np.testing.assert_allclose([p.ood_score for p in onnx_preds],
                               [p.ood_score for p in torch_preds], rtol=1e-3)
    assert any(p.ood for p in onnx_preds) and not all(p.ood for p in onnx_preds)
