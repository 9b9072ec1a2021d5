"""Explanations of ensemble and TTA packages are the mean of the members' maps over every view,
each view's map flipped back — computed here by hand from the member packages and compared."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from conftest import synthetic_ecg_observation

# the views of ``tta: flips`` on a 2D image, as axes of one (C, H, W) input or (H, W) map
FLIPS_2D = [(-2, -1), (-2,), (-1,), ()]
BENIGN = 0  # the class whose maps these untrained members spread over the image
IMAGE = {"task": {"kind": "binary", "class_names": ["benign", "malignant"],
                  "positive_class": "malignant"},
         "network": "resnet18", "options": {},
         "spec": {"spatial_dims": 2, "channels": 1, "size": 28, "normalize": "dtype-range",
                  "format": "medmnist", "value_range": [0, 255], "task_kind": "binary",
                  "positive_index": 1}}
ECG = {"task": {"kind": "binary", "class_names": ["normal", "af"], "positive_class": "af"},
       "network": "resnet1d",
       "options": {"layers": [1, 1, 1, 1], "widths": [8, 8, 16, 16], "stem_stride": 4},
       "spec": {"modality": "ecg", "leads": ["I"], "fs": 100.0, "length": 500, "stride": 250,
                "min_seconds": 2.0, "channels": 1, "spatial_dims": 1, "normalize": "zscore",
                "aggregate": "mean", "task_kind": "binary", "positive_index": 1}}


def _member(out, modality: str, recipe: dict, seed: int):
    """A package of one seeded, untrained network: members of one recipe with other weights
    (training real members costs minutes on the loaded 2-core machine; the maps' arithmetic
    is the point here, and untrained networks give maps that differ member to member)."""
    from meddx.modalities import get_modality
    from meddx.models import build_network
    from meddx.package import ModelCard, save_package
    from meddx.tasks import TaskSpec

    task = TaskSpec(**recipe["task"])
    torch.manual_seed(seed)
    net = build_network(recipe["network"], num_outputs=task.num_outputs,
                        spec=get_modality(modality).network_spec(recipe["spec"]),
                        options=recipe["options"])
    card = ModelCard(name=f"{modality}-{seed}", modality=modality, task=task,
                     network={"name": recipe["network"], "options": recipe["options"]},
                     preprocessing=recipe["spec"])
    return save_package(out / f"{modality}-{seed}", net.eval(), card)


def _join(paths, out, tta):
    from meddx.training.combine import join_packages

    return join_packages(paths, out, tta=tta, post_hoc=False)


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two image packages of one recipe (seeds 0 and 1)."""
    tmp = tmp_path_factory.mktemp("members")
    return [_member(tmp, "image", IMAGE, seed) for seed in (0, 1)]


@pytest.fixture(scope="module")
def joined(members, tmp_path_factory):
    """The ensemble of the two, the first with TTA flips, and the ensemble with TTA flips."""
    tmp = tmp_path_factory.mktemp("joined")
    a, b = (m.path for m in members)
    return {"ensemble": _join([a, b], tmp / "ens", "none"),
            "tta": _join([a], tmp / "tta", "flips"),
            "both": _join([a, b], tmp / "both", "flips")}


@pytest.fixture(scope="module")
def lopsided() -> np.ndarray:
    """A 28×28 image that no flip maps onto itself: a bright block in the top-left corner and
    a faint ramp, over fixed noise."""
    rng = np.random.default_rng(7)
    img = rng.integers(0, 60, (28, 28)).astype(np.float64)
    img[3:13, 2:10] += 180
    img += np.linspace(0, 40, 28)[None, :]
    return np.clip(img, 0, 255).astype(np.uint8)


def _predictor(package):
    from meddx.inference import load_model

    return load_model(package.path, backend="torch")


def _map(package, sample, k):
    """The package's own explanation (its Predictor's explainer: what REST, CDS and DICOM use)."""
    return _predictor(package).explainer().explain(sample, k)


def test_ensemble_map_is_the_mean_of_its_members_maps(members, joined, lopsided):
    ens = _predictor(joined["ensemble"])
    sample = ens.read(lopsided)
    got = ens.explainer().explain(sample, BENIGN)
    # each member's map, from the member packages themselves
    plain = [_predictor(p).explainer() for p in members]
    maps = [e.explain(sample, BENIGN) for e in plain]
    assert got.shape == (28, 28) and got.dtype == np.float32
    assert not np.allclose(maps[0], maps[1], atol=1e-3)  # the members disagree
    np.testing.assert_allclose(got, np.mean(maps, axis=0), atol=1e-5)
    # member 1 alone (what the ensemble's explanation used to be) is not the ensemble's map
    assert np.abs(got - maps[0]).max() > 1e-2
    assert ens.explainer().averaged == {"members": 2, "views": 1}
    # a prediction's explanation (REST, CDS Hooks and DICOM heat maps go this way) is the
    # same mean, for the class the prediction names
    pred = ens.predict_samples([sample], explain=True)[0]
    k = ens.task.class_names.index(pred.label)
    expected = np.mean([e.explain(sample, k) for e in plain], axis=0)
    np.testing.assert_allclose(pred.explanation, expected, atol=1e-5)
    # no class named: the ensemble's own top class, not a member's
    assert ens.explainer().top_class(sample) == k
    np.testing.assert_allclose(ens.explainer().explain(sample), expected, atol=1e-5)


def test_tta_map_is_the_mean_of_the_views_flipped_back(members, joined, lopsided):
    tta = _predictor(joined["tta"])
    sample = tta.read(lopsided)
    got = tta.explainer().explain(sample, BENIGN)
    plain = _predictor(members[0]).explainer()
    x = sample.tensor
    seen = [plain.explain(x.flip(axes) if axes else x, BENIGN) for axes in FLIPS_2D]
    back = [np.flip(m, axes) if axes else m for m, axes in zip(seen, FLIPS_2D, strict=True)]
    np.testing.assert_allclose(got, np.mean(back, axis=0), atol=1e-5)
    # the input is lopsided, so leaving the views' maps in their flipped frames is wrong …
    assert np.abs(got - np.mean(seen, axis=0)).max() > 1e-2
    # … and so is the unflipped view alone (the old explanation)
    assert np.abs(got - back[-1]).max() > 1e-2
    assert tta.explainer().averaged == {"members": 1, "views": 4}


def test_ensemble_with_tta_averages_every_member_on_every_view(members, joined, lopsided):
    both = _predictor(joined["both"])
    images = [lopsided, lopsided.T.copy(), np.roll(lopsided, 9, axis=0)]
    xs = torch.stack([torch.as_tensor(both.read(im).tensor) for im in images]).float()
    explainer = both.explainer()
    got = explainer.explain_batch(xs, BENIGN)  # the report's error gallery goes this way
    members = [_predictor(p).explainer() for p in members]
    # each member's batch maps of each view, flipped back: the same arithmetic as the package's
    maps = [np.flip(m.explain_batch(xs.flip(a), BENIGN), a) if a
            else m.explain_batch(xs, BENIGN) for m in members for a in FLIPS_2D]
    np.testing.assert_allclose(got, np.mean(maps, axis=0), atol=1e-5)
    for i in range(len(xs)):
        # one image at a time agrees up to the convolutions' batch-size arithmetic
        np.testing.assert_allclose(explainer.explain(xs[i], BENIGN), got[i], atol=5e-3)
    assert explainer.describe() == "mean of 2 members × 4 views"


@pytest.mark.parametrize("method", ["integrated_gradients", "gradcam"])
def test_ecg_ensemble_saliency_is_the_mean_of_its_members(tmp_path, method):
    from meddx.models.explain import combined_explainer

    parts = [_member(tmp_path, "ecg", ECG, seed) for seed in (0, 1)]
    joined = _join([p.path for p in parts], tmp_path / "ens", None)
    ens = _predictor(joined)
    sample = ens.read(synthetic_ecg_observation())
    options = {"task": ens.task, "network": joined.card.network["name"], "method": method}
    got = combined_explainer(ens.modality, ens.model, joined.card.preprocessing,
                             **options).explain(sample, 1)
    members = [combined_explainer(p.modality, p.model, p.card.preprocessing, **options)
               .explain(sample, 1) for p in map(_predictor, parts)]
    assert got.shape == np.asarray(sample.tensor).shape
    assert not np.allclose(members[0], members[1])
    np.testing.assert_allclose(got, np.mean(members, axis=0), rtol=1e-4, atol=1e-6)
    assert np.abs(got - members[0]).max() > 1e-3 * np.abs(members[0]).max()
    if method == "integrated_gradients":  # the Predictor's (the service's) default
        np.testing.assert_allclose(ens.explainer().explain(sample, 1), got, rtol=1e-4,
                                   atol=1e-6)
        summary = ens.explainer().summary(sample, got)
        assert summary["averaged_over"] == {"members": 2, "views": 1} and "peak_s" in summary


def test_rest_and_cli_say_what_the_map_averages(joined, tmp_path, lopsided):
    from meddx.cli import app
    from meddx.serving.app import create_app
    from meddx.serving.auth import new_api_key
    from meddx.serving.settings import ServeSettings

    both = joined["both"]
    png = tmp_path / "scan.png"
    Image.fromarray(lopsided).save(png)
    out = tmp_path / "cam.png"
    r = CliRunner().invoke(app, ["explain", str(both.path), str(png), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "mean of 2 members × 4 views" in r.output and out.stat().st_size > 0
    key = new_api_key("tester")
    settings = ServeSettings(api_keys={"tester": key[1]}, research_use=True, warmup=False,
                             audit_log=tmp_path / "audit.jsonl")
    with TestClient(create_app([both.path], settings)) as client:
        resp = client.post(f"/v1/models/{both.card.name}/predict?explain=true",
                           headers={"Authorization": f"Bearer {key[0]}"},
                           files={"file": ("scan.png", png.read_bytes(), "image/png")})
    assert resp.status_code == 200, resp.text
    [p] = resp.json()["predictions"]
    assert base64.b64decode(p["heatmap_png"]).startswith(b"\x89PNG")
    assert p["explanation"] == {"averaged_over": {"members": 2, "views": 4}}
