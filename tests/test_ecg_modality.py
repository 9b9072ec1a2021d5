"""The ECG modality against the contract: PhysioNet 2017 splits, windows and aggregation,
augmentations, networks, explanation on the trace, and the challenge score."""

from __future__ import annotations

from collections import Counter
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import require_data
from meddx.catalog import get_entry
from meddx.config import DataConfig
from meddx.errors import ConfigError, DataError
from meddx.modalities import get_modality
from meddx.modalities.ecg.score import bootstrap_challenge_score, challenge_score
from meddx.models import build_network

SPEC = {"modality": "ecg", "leads": ["ECG"], "fs": 150.0, "length": 1500, "stride": 750,
        "min_seconds": 5.0, "channels": 1, "spatial_dims": 1,
        "augment": {"scale": 0.2, "baseline_wander": 0.2, "noise": 0.05}}


@pytest.fixture(scope="module")
def p17() -> Path:
    return require_data("ecg/physionet2017")


@pytest.fixture(scope="module")
def bundle(p17: Path):
    data = DataConfig(dataset="physionet2017", limit=40, options={"cache": False})
    return get_modality("ecg").load(data, get_entry("physionet2017"), None, seed=0)


def _split_list(name: str) -> list[str]:
    f = resources.files("meddx.modalities.ecg").joinpath("splits", f"physionet2017_{name}.txt")
    return f.read_text().split()


def test_saved_split_lists_are_disjoint_complete_and_stratified(p17: Path) -> None:
    ref = pd.read_csv(p17 / "REFERENCE.csv", header=None, names=["id", "label"])
    lists = {k: _split_list(k) for k in ("train", "val", "test")}
    assert [len(v) for v in lists.values()] == [5115, 683, 1024]
    ids = [i for v in lists.values() for i in v]
    assert len(set(ids)) == len(ids) and set(ids) == set(ref.id)
    overall = ref.label.value_counts(normalize=True)
    label = dict(zip(ref.id, ref.label, strict=True))
    for v in lists.values():
        share = pd.Series([label[i] for i in v]).value_counts(normalize=True)
        assert (share - overall).abs().max() < 0.01


def test_load_gives_four_splits_with_calib_carved_from_train(bundle) -> None:
    assert set(bundle.splits) == {"train", "val", "calib", "test"}
    assert bundle.task.label_values == ["N", "A", "O", "~"]
    train, calib = set(bundle.splits["train"].ids), set(bundle.splits["calib"].ids)
    assert not train & calib
    assert train | calib <= set(_split_list("train"))  # never from val or test
    assert set(bundle.splits["test"].ids) <= set(_split_list("test"))
    spec = bundle.input_spec
    assert spec["fs"] == 100 and spec["length"] == 3000 and spec["leads"] == ["ECG"]
    x = bundle.splits["val"].inputs[0]
    assert x.shape[0] == 1 and abs(float(np.std(x)) - 1) < 1e-3  # z-scored record


def test_transforms_crop_randomly_in_training_and_centrally_otherwise(bundle) -> None:
    ecg = get_modality("ecg")
    spec = bundle.input_spec
    item = ecg.item_tensor(bundle.splits["train"].inputs[0], spec)
    train_t, eval_t = ecg.transforms(True, spec, None), ecg.transforms(False, spec, None)
    torch.manual_seed(0)
    a, b = train_t(item), train_t(item)
    assert a.shape == b.shape == (1, 3000) and not torch.equal(a, b)
    assert torch.equal(eval_t(item), eval_t(item))
    long = torch.randn(1, 9000)
    short = torch.randn(1, 1000)
    xb, yb = ecg.collate([(long, torch.tensor(0)), (short, torch.tensor(2))])
    assert xb.shape == (2, 1, 3000) and yb.tolist() == [0, 2]
    torch.testing.assert_close(xb[0], long[:, 3000:6000])
    # a fresh instance (as the Predictor holds) crops to the window too, without transforms
    from torch.utils.data import DataLoader

    from meddx.modalities.base import SplitDataset

    fresh = get_modality("ecg")
    ds = SplitDataset(fresh, bundle.splits["val"], spec, transform=None)
    x, _ = next(iter(DataLoader(ds, batch_size=8, collate_fn=fresh.collate)))
    assert x.shape == (8, 1, 3000)


def test_read_windows_a_long_record_and_aggregates(p17: Path) -> None:
    ecg = get_modality("ecg")
    s = ecg.read(p17 / "A00005.hea", SPEC)  # 60 s → 9000 samples at 150 Hz
    assert s.meta["windows"] and s.tensor.shape == (11, 1, 1500)
    assert s.meta["starts"][-1] == 7500 and s.meta["source_fs"] == 300
    probs = np.array([[0.8, 0.2, 0, 0], [0.4, 0.6, 0, 0]])
    np.testing.assert_allclose(ecg.aggregate(probs), [0.6, 0.4, 0, 0])
    logits = np.log(np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1]]))
    agg = torch.softmax(torch.tensor(ecg.aggregate_logits(logits)), 0).numpy()
    np.testing.assert_allclose(agg, [0.4, 0.4, 0.1, 0.1], atol=1e-6)
    # the same record as bytes (an upload) and as an array at the model's rate
    up = ecg.read({"A00005.hea": (p17 / "A00005.hea").read_bytes(),
                   "A00005.mat": (p17 / "A00005.mat").read_bytes()}, SPEC)
    torch.testing.assert_close(up.tensor, s.tensor)
    arr = ecg.read(s.meta["signal"], SPEC)
    torch.testing.assert_close(arr.tensor, s.tensor, atol=1e-5, rtol=0)
    with pytest.raises(DataError, match="cannot read an ECG"):
        ecg.read(3.5, SPEC)


def test_networks_take_the_spec_and_are_configurable() -> None:
    ecg = get_modality("ecg")
    spec = ecg.network_spec(SPEC)
    assert spec == {"spatial_dims": 1, "in_channels": 1, "size": None, "length": 1500}
    name, options = ecg.default_network(None, SPEC)
    x = torch.randn(2, 1, 1500)
    for net_name, opts in ((name, options), ("cnn_gru", {"hidden": 16})):
        net = build_network(net_name, num_outputs=4, spec=spec, options=opts)
        assert net(x).shape == (2, 4)
    with pytest.raises(ConfigError, match="spatial_dims=1"):
        build_network("resnet1d", num_outputs=4, spec={**spec, "spatial_dims": 2})
    with pytest.raises(ConfigError, match="unknown resnet1d options"):
        build_network("resnet1d", num_outputs=4, spec=spec, options={"depth": 3})


@pytest.mark.parametrize("method", ["integrated_gradients", "gradcam"])
def test_explanation_on_the_trace(p17: Path, tmp_path: Path, method: str) -> None:
    ecg = get_modality("ecg")
    torch.manual_seed(0)
    net = build_network("resnet1d", num_outputs=4, spec=ecg.network_spec(SPEC)).eval()
    s = ecg.read(p17 / "A00002.hea", SPEC)  # 30 s → 5 windows
    explainer = ecg.explainer(net, SPEC, method=method, network="resnet1d", n_steps=4)
    attr = explainer.explain(s, 1)
    assert attr.shape == tuple(s.tensor.shape) and np.isfinite(attr).all()
    assert np.abs(attr).sum() > 0
    out = explainer.plot(s, attr, tmp_path / "af.png", title="af 0.80")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_challenge_score_known_answer() -> None:
    y = ["N", "N", "A", "A", "O", "O", "~", "N"]
    p = ["N", "A", "A", "A", "O", "N", "~", "N"]
    out = challenge_score(y, p)
    # F1: N 2·2/(3+3)=0.667, A 2·2/(2+3)=0.8, O 2·1/(2+1)=0.667
    assert out["f1"]["N"] == pytest.approx(2 / 3)
    assert out["f1"]["A"] == pytest.approx(0.8)
    assert out["f1"]["O"] == pytest.approx(2 / 3)
    assert out["score"] == pytest.approx((2 / 3 + 0.8 + 2 / 3) / 3)
    assert out["confusion"][0] == [2, 1, 0, 0]
    ci = bootstrap_challenge_score(y, p, n_boot=50)
    assert ci["ci_low"] <= out["score"] <= ci["ci_high"]
    assert Counter(challenge_score([0, 1, 2, 3], [0, 1, 2, 3])["f1"].values()) == {1.0: 4}


@pytest.mark.slow
def test_train_predict_and_explain_end_to_end(tmp_path: Path, p17: Path) -> None:
    from meddx.inference import load_model
    from meddx.training import train

    cfg = {"name": "ecg-tiny", "seed": 0,
           "data": {"dataset": "physionet2017", "limit": 32,
                    "options": {"cache": False, "window_seconds": 10, "stride_seconds": 10}},
           "model": {"name": "cnn_gru", "options": {"hidden": 16, "widths": [16, 32]}},
           "train": {"epochs": 1, "batch_size": 16, "early_stopping_patience": None,
                     "threads": 1}}
    package = train(cfg, out=tmp_path / "run", progress=False)
    assert package.card.preprocessing["length"] == 1000  # 10 s at the catalog's 100 Hz
    predictor = load_model(package.path)
    preds = predictor.predict([p17 / "A00005.hea"], explain=True)
    assert set(preds[0].probabilities) == {"normal", "af", "other", "noisy"}
    assert preds[0].notes["windows"] and preds[0].explanation.shape == (6, 1, 1000)
