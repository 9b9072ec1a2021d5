"""EHR modality on a tiny PhysioNet 2012 folder: splits, features, truncation, networks,
explanations, the predictor from a Bundle vs the file; the tabular modality; Event 1."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import require_data
from meddx.config import DataConfig
from meddx.errors import ConfigError, EvaluationError, InputMismatchError
from meddx.modalities import get_modality
from meddx.modalities.ehr.features import encode, truncate
from meddx.modalities.ehr.modality import EHRModality, RandomTruncation
from meddx.modalities.ehr.score import event1_score, event1_threshold
from meddx.models import build_network

N_STAYS = 60


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """60 real stays (symlinked, never copied into the repo) + their outcomes."""
    src = require_data("ehr/physionet2012")
    root = tmp_path_factory.mktemp("p2012")
    (root / "set-a").mkdir()
    outcomes = pd.read_csv(src / "Outcomes-a.txt")
    # all deaths among the first 200 stays, then survivors, for two classes in every split
    head = outcomes.iloc[:200]
    pick = pd.concat([head[head["In-hospital_death"] == 1].iloc[:15],
                      head[head["In-hospital_death"] == 0].iloc[:N_STAYS - 15]])
    for rid in pick["RecordID"]:
        (root / "set-a" / f"{rid}.txt").symlink_to(src / "set-a" / f"{rid}.txt")
    pick.to_csv(root / "Outcomes-a.txt", index=False)
    return root


@pytest.fixture(scope="module")
def bundle(tiny_root, tmp_path_factory):
    old = os.environ.get("MEDDX_CACHE")
    os.environ["MEDDX_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        data = DataConfig(path=str(tiny_root), modality="ehr", val_fraction=0.2,
                          test_fraction=0.2, options={"progress": False})
        yield EHRModality().load(data, None, None, seed=0)
    finally:
        if old is None:
            os.environ.pop("MEDDX_CACHE", None)
        else:
            os.environ["MEDDX_CACHE"] = old


def test_load_splits_metadata_and_spec(bundle):
    assert list(bundle.splits) == ["train", "val", "calib", "test"]
    ids = [i for s in bundle.splits.values() for i in s.ids]
    assert len(ids) == len(set(ids)) == N_STAYS
    spec = bundle.input_spec
    for s in bundle.splits.values():
        assert s.inputs.shape[1:] == (spec["channels"], 48)
        assert set(s.metadata.columns) >= {"sex", "age_band", "icu_type", "saps_i", "hours"}
    assert bundle.task.positive_class == "died"
    assert sum(int(s.targets.sum()) for s in bundle.splits.values()) == 15
    # train statistics are in the spec (they travel in the card)
    assert set(spec["stats"]["series"]) == set(spec["variables"])
    train = bundle.splits["train"].inputs
    hr = spec["variables"].index("HR")
    seen = train[:, len(spec["variables"]) + hr] > 0
    assert abs(train[:, hr][seen].mean()) < 0.05  # standardised with train statistics


def test_own_record_lists_from_a_folder(bundle, tiny_root, tmp_path, monkeypatch):
    """split_lists may name a folder of train/val/test.txt (e.g. cross-validation folds)."""
    from meddx.modalities.ehr.io import split_list_path

    # a folder named like the packaged lists in the working directory does not shadow them
    monkeypatch.chdir(tmp_path)
    (tmp_path / "physionet2012").mkdir()
    assert split_list_path("physionet2012", "test").name == "physionet2012_test.txt"
    assert split_list_path("physionet2012", "test").is_file()
    ids = sorted(i for s in bundle.splits.values() for i in s.ids)
    lists = {"train": ids[:40], "val": ids[40:50], "test": ids[50:]}
    for split, rec in lists.items():
        (tmp_path / f"{split}.txt").write_text("# fold 0\n" + "\n".join(rec) + "\n")
    data = DataConfig(path=str(tiny_root), modality="ehr", calib_fraction=0.0,
                      options={"progress": False, "split_lists": str(tmp_path)})
    own = EHRModality().load(data, None, None, seed=0)
    assert {k: sorted(s.ids) for k, s in own.splits.items()} == lists
    (tmp_path / "val.txt").unlink()
    with pytest.raises(ConfigError, match="val.txt"):
        EHRModality().load(data, None, None, seed=0)


def test_truncation_equals_reading_fewer_hours(bundle, tiny_root):
    spec = bundle.input_spec
    m = EHRModality()
    path = next((tiny_root / "set-a").iterdir())
    full = m.read(path, spec)
    assert full.meta["hours_used"] >= 24
    # the same stay cut at 12 h by a prediction time: equals truncating the full tensor
    from meddx.modalities.ehr.features import bin_stay
    from meddx.modalities.ehr.io import read_physionet_stay

    stay = read_physionet_stay(path)
    stay.prediction_minutes = 11 * 60 + 59
    b = bin_stay(stay)
    at12 = encode(b.values, b.static, b.hours, spec["stats"])
    np.testing.assert_array_equal(at12, truncate(full.tensor.numpy(), 12, spec["layout"]))
    t = RandomTruncation(spec["layout"], min_hours=6)
    torch.manual_seed(0)
    for _ in range(5):
        x = t(full.tensor)
        h = int(x[-1].sum())
        assert 6 <= h <= full.meta["hours_used"]
        assert torch.equal(x, torch.from_numpy(truncate(full.tensor.numpy(), h, spec["layout"])))
    assert m.transforms(False, spec, None) is None


@pytest.mark.parametrize("name", ["grud", "grud-ensemble", "ehr_transformer", "logistic", "mlp"])
def test_networks_read_only_the_window(bundle, name):
    spec = bundle.input_spec
    small = {"grud": {"hidden": 16}, "ehr_transformer": {"d_model": 16, "layers": 1},
             "grud-ensemble": {"hidden": 16, "members": 3, "pooling": "mean_max"}}
    net = build_network(name.split("-")[0], num_outputs=1, spec=EHRModality().network_spec(spec),
                        options=small.get(name)).eval()
    x = torch.from_numpy(bundle.splits["train"].inputs[:4])
    cut = truncate(x, 10, spec["layout"])
    noisy = cut.clone()
    v3 = spec["layout"]["deltas"][1]
    noisy[:, :v3, 10:] = torch.randn_like(noisy[:, :v3, 10:])  # junk after the window
    with torch.no_grad():
        assert net(x).shape == (4, 1)
        torch.testing.assert_close(net(cut), net(noisy))


def _grud_one_bin_at_a_time(net, x):
    """GRU-D as in Che et al. (2018), one bin at a time: the reference for the vectorised
    forward pass (which moves every hidden-state-free step out of the recurrence)."""
    from meddx.modalities.ehr.networks import _split, summary_features

    values, mask, delta, static, valid = _split(x, net.n_vars, net.n_static)
    gamma_x = torch.exp(-torch.relu(net.decay_x_w[:, None] * delta + net.decay_x_b[:, None]))
    gamma_h = torch.exp(-torch.relu(net.decay_h(delta.transpose(1, 2))))
    h = torch.tanh(net.h0(static))
    x_last = torch.zeros_like(values[:, :, 0])
    total, top = torch.zeros_like(h), torch.full_like(h, -1.0)
    for step in range(values.shape[-1]):
        m, v = mask[:, :, step], values[:, :, step]
        x_hat = m * v + (1 - m) * gamma_x[:, :, step] * x_last
        x_last = m * v + (1 - m) * x_last
        new = net.cell(torch.cat([x_hat, m], dim=1), h * gamma_h[:, step])
        keep = valid[:, step, None]
        h = keep * new + (1 - keep) * h
        total = total + keep * h
        top = torch.maximum(top, keep * h + (1 - keep) * -1.0)
    if net.pooling == "mean_max":
        h = torch.cat([h, total / valid.sum(1, keepdim=True).clamp_min(1), top], dim=1)
    out = net.head(torch.cat([h, static], dim=1))
    if net.wide is not None:
        out = out + net.wide(summary_features(x, net.n_vars, net.n_static))
    return out


@pytest.mark.parametrize("options", [{"pooling": "last"}, {"pooling": "mean_max", "wide": True}])
def test_grud_forward_matches_the_recurrence_it_vectorises(bundle, options):
    """Same outputs and input gradients as the per-bin recurrence, also with the fractional
    masks integrated gradients passes through (where imputation must blend, not switch)."""
    spec = bundle.input_spec
    torch.manual_seed(0)
    net = build_network("grud", num_outputs=1, spec=EHRModality().network_spec(spec),
                        options={"hidden": 16, **options}).eval()
    x = truncate(torch.from_numpy(bundle.splits["train"].inputs[:6]).clone(), 20,
                 spec["layout"])
    m0, m1 = spec["layout"]["masks"]
    for scale in (1.0, 0.37):  # observed/unobserved, and a point on an IG path
        xs = x.clone()
        xs[:, m0:m1] *= scale
        xs.requires_grad_(True)
        ours, ref = net(xs), _grud_one_bin_at_a_time(net, xs)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        g_ours, = torch.autograd.grad(ours.sum(), xs)
        g_ref, = torch.autograd.grad(ref.sum(), xs)
        # the window channel selects bins (0/1, the same in every IG baseline): no gradient
        torch.testing.assert_close(g_ours[:, :-1], g_ref[:, :-1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", [{"pooling": "last"}, {"pooling": "mean_max", "wide": True}])
def test_grud_ensemble_is_the_mean_of_its_members(bundle, options):
    """One module, K GRU-D networks: its output is the mean of K plain GRU-D networks carrying
    each member's weights; members start from different weights; joining separately built
    networks gives back exactly their mean."""
    from meddx.modalities.ehr.networks import GRUD, GRUDEnsemble

    spec = bundle.input_spec
    torch.manual_seed(0)
    net = build_network("grud", num_outputs=1, spec=EHRModality().network_spec(spec),
                        options={"hidden": 16, "members": 3, **options}).eval()
    assert isinstance(net, GRUDEnsemble)
    x = truncate(torch.from_numpy(bundle.splits["train"].inputs[:6]).clone(), 30,
                 spec["layout"])
    members = [net.member(k) for k in range(3)]
    assert all(isinstance(m, GRUD) for m in members)
    assert not torch.equal(members[0].cell.weight_hh, members[1].cell.weight_hh)
    with torch.no_grad():
        each = torch.stack([m(x) for m in members])
        torch.testing.assert_close(net.member_logits(x), each, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(net(x), each.mean(0), rtol=1e-5, atol=1e-5)
        joined = GRUDEnsemble.from_members(members[::-1])
        torch.testing.assert_close(joined(x), each.mean(0), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="two or more"):
        GRUDEnsemble.from_members(members[:1])
    other = build_network("grud", num_outputs=1, spec=EHRModality().network_spec(spec),
                          options={"hidden": 8, **options})
    with pytest.raises(Exception, match="one architecture"):
        GRUDEnsemble.from_members([members[0], other])
    with pytest.raises(Exception, match="members"):
        build_network("grud", num_outputs=1, spec=EHRModality().network_spec(spec),
                      options={"members": 0})


def test_explainer_names_findings_in_words(bundle, tmp_path):
    spec = bundle.input_spec
    net = build_network("grud", num_outputs=1, spec=EHRModality().network_spec(spec),
                        options={"hidden": 16})
    explainer = EHRModality().explainer(net, spec, n_steps=4, task=bundle.task, network="grud")
    words, attr = explainer.explain(torch.from_numpy(bundle.splits["test"].inputs[0]))
    assert attr.shape == (spec["channels"], 48)
    assert 1 <= len(words) <= 4 and all(isinstance(w, str) and w for w in words)
    per = explainer.per_variable(attr)
    assert set(per) == {*spec["variables"], "Age"}
    png = explainer.plot(torch.from_numpy(bundle.splits["test"].inputs[0]), attr,
                         tmp_path / "attr.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_describe_variable_words():
    from meddx.modalities.ehr.features import describe_variable

    lactate = np.full(48, np.nan)
    lactate[[2, 10, 20]] = [1.5, 3.0, 4.2]
    z = np.where(np.isnan(lactate), np.nan, np.log1p(lactate))
    assert describe_variable("Lactate", lactate, z / 0.5) == "lactate high and rising (4.2 mmol/L)"
    gcs = np.full(48, np.nan)
    gcs[5] = 6
    assert describe_variable("GCS", gcs) == "GCS low (6)"


@pytest.mark.slow
def test_predictor_gives_the_same_risk_from_bundle_and_file(tiny_root, tmp_path):
    from meddx.inference import load_model
    from meddx.modalities.ehr.fhir import physionet_to_bundle
    from meddx.training import train

    os.environ.setdefault("MEDDX_CACHE", str(tmp_path / "cache"))
    package = train({"name": "icu-tiny", "seed": 0,
                     "data": {"path": str(tiny_root), "modality": "ehr",
                              "options": {"progress": False}},
                     "model": {"name": "logistic"},
                     "train": {"epochs": 1, "batch_size": 16, "early_stopping_patience": None,
                               "precision": "32"}},
                    out=tmp_path / "run", progress=False)
    predictor = load_model(package.path, backend="torch")
    path = next((tiny_root / "set-a").iterdir())
    from_file, from_bundle = predictor.predict([path, physionet_to_bundle(path)], explain=True)
    assert from_file.probabilities == from_bundle.probabilities
    assert from_file.notes["hours_used"] == from_bundle.notes["hours_used"]
    ra = predictor.modality.to_fhir(from_bundle, predictor.card)
    from fhir.resources.R4B.riskassessment import RiskAssessment

    RiskAssessment.model_validate(ra)
    assert ra["prediction"][0]["rationale"].startswith(f"{from_file.notes['hours_used']} h")
    assert ra["note"][-1]["text"].startswith("Top contributing findings: ")


def test_ensemble_is_trained_as_separate_runs_and_resumed(tiny_root, tmp_path, caplog):
    """members: 2 → two runs (seeds 0 and 1) joined into one package, calibrated as a whole;
    --resume keeps members already trained."""
    from meddx.modalities.ehr.networks import GRUDEnsemble
    from meddx.training import train

    os.environ.setdefault("MEDDX_CACHE", str(tmp_path / "cache"))
    cfg = {"name": "icu-ens", "seed": 0,
           "data": {"path": str(tiny_root), "modality": "ehr", "options": {"progress": False}},
           "model": {"name": "grud", "options": {"hidden": 8, "members": 2}},
           "train": {"epochs": 1, "batch_size": 16, "early_stopping_patience": None,
                     "precision": "32"}}
    lightning = [logging.getLogger(f"lightning.{m}.utilities.rank_zero")
                 for m in ("pytorch", "fabric")]
    said: list[str] = []
    grab = logging.Handler(logging.INFO)
    grab.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    levels = [lg.level for lg in lightning]
    for lg in lightning:  # Lightning's own loggers may not propagate to caplog's root handler
        lg.addHandler(grab)
        lg.setLevel(logging.INFO)
    try:
        package = train(cfg, out=tmp_path / "run", progress=False)
    finally:
        for lg, level in zip(lightning, levels, strict=True):
            lg.removeHandler(grab)
            lg.setLevel(level)
    # Lightning's banner once for the ensemble, not once per member; no advertisement
    assert sum(m.startswith("GPU available") for m in said) == 1
    assert not any("litlogger" in m for m in said)
    assert isinstance(package.build_model(), GRUDEnsemble)
    assert package.card.network == {"name": "grud", "options": {"hidden": 8, "members": 2}}
    runs = package.card.training["members"]
    assert [m["seed"] for m in runs] == [0, 1] and len({m["best_score"] for m in runs}) == 2
    assert package.card.calibration is not None  # fitted on the ensemble's output
    # a member's seed changes its weights and batches, never the split (this folder's split
    # is drawn with the seed): no member may train on the ensemble's calib or test stays
    split = (tmp_path / "run" / "splits.json").read_text()
    assert all((tmp_path / "run" / "members" / str(k) / "splits.json").read_text() == split
               for k in range(2))
    weights = [(tmp_path / "run" / "members" / str(k) / "model" / "weights.safetensors")
               for k in range(2)]
    before = [w.read_bytes() for w in weights]
    weights[1].parent.joinpath("manifest.json").unlink()  # member 1 unfinished
    with caplog.at_level("INFO", logger="meddx.training"):
        again = train(cfg, out=tmp_path / "run", progress=False, resume=True)
    assert "member 1/2: kept" in caplog.text and "member 2/2 (seed 1)" in caplog.text
    assert weights[0].read_bytes() == before[0]
    assert again.card.training["members"][0] == runs[0]

    import yaml
    from typer.testing import CliRunner

    from meddx.cli import app

    (tmp_path / "ens.yaml").write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["train", str(tmp_path / "ens.yaml"), "--out",
                                      str(tmp_path / "cli"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "icu-ens: ensemble of 2, val_auroc = " in " ".join(result.output.split())


def test_ensemble_members_can_train_on_part_of_train(tiny_root, tmp_path):
    """train.member_fraction: each member trains on its own stratified part of the train
    split; val, calib and test stay the ensemble's."""
    import json

    from meddx.training import train

    os.environ.setdefault("MEDDX_CACHE", str(tmp_path / "cache"))
    train({"name": "icu-bag", "seed": 0,
           "data": {"path": str(tiny_root), "modality": "ehr", "options": {"progress": False}},
           "model": {"name": "grud", "options": {"hidden": 8, "members": 2}},
           "train": {"epochs": 1, "batch_size": 16, "early_stopping_patience": None,
                     "precision": "32", "member_fraction": 0.7}},
          out=tmp_path / "run", progress=False)
    whole = json.loads((tmp_path / "run" / "splits.json").read_text())
    parts = [json.loads((tmp_path / "run" / "members" / str(k) / "splits.json").read_text())
             for k in range(2)]
    for part in parts:
        assert {k: part[k] for k in ("val", "calib", "test")} == \
            {k: whole[k] for k in ("val", "calib", "test")}
        assert set(part["train"]["ids"]) < set(whole["train"]["ids"])
        assert len(part["train"]["ids"]) == pytest.approx(0.7 * len(whole["train"]["ids"]), abs=1)
    assert parts[0]["train"] != parts[1]["train"]


# ------------------------------------------------------------------------------ tabular
@pytest.fixture(scope="module")
def heart():
    from meddx.catalog import get_entry

    require_data("ehr/uci_heart_disease/processed.cleveland.data")
    entry = get_entry("uci_heart")
    return get_modality("tabular").load(DataConfig(dataset="uci_heart"), entry, entry.task, 0)


def test_uci_heart_tabular(heart):
    assert sum(len(s) for s in heart.splits.values()) == 303
    assert heart.task.positive_class == "disease"
    spec = heart.input_spec
    assert "ca_missing" in spec["feature_names"] and "thal=7" in spec["feature_names"]
    tab = get_modality("tabular")
    row = {"age": 63, "sex": 1, "cp": 1, "trestbps": 145, "chol": 233, "fbs": 1, "restecg": 2,
           "thalach": 150, "exang": 0, "oldpeak": 2.3, "slope": 3, "ca": None, "thal": 6,
           "extra": 1}
    s = tab.read(row, spec)
    assert s.tensor.shape == (spec["n_features"],)
    assert s.meta["imputed"] == ["ca"] and s.meta["ignored"] == ["extra"]
    with pytest.raises(InputMismatchError, match="never seen"):
        tab.read({**row, "thal": 9}, spec)
    net = build_network("mlp", num_outputs=1, spec=tab.network_spec(spec))
    words, attr = tab.explainer(net, spec).explain(s)
    assert attr.shape == (spec["n_features"],) and len(words) == 4


# ------------------------------------------------------------------------------ Event 1
def test_event1_known_answer():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    s = np.array([.9, .8, .3, .2, .85, .7, .1, .1, .05, .0])
    out = event1_score(y, s, 0.5)  # flags 4: TP 2 → Se 2/4, PPV 2/4
    assert out == {"event1": 0.5, "sensitivity": 0.5, "ppv": 0.5, "threshold": 0.5,
                   "n_flagged": 4}
    thr, best = event1_threshold(y, s)
    assert best == pytest.approx(event1_score(y, s, thr)["event1"])
    assert (thr, best) == (0.2, pytest.approx(2 / 3))  # flags 6: Se 4/4, PPV 4/6
    assert event1_score(y, s, 2.0)["event1"] == 0.0  # nothing flagged scores 0
    # prevalence: flag as many as there are deaths (4): .9 .85 .8 .7 → TP 2, Se = PPV = 1/2
    assert event1_threshold(y, s, method="prevalence") == (0.7, 0.5)
    with pytest.raises(EvaluationError, match="unknown Event 1 threshold method"):
        event1_threshold(y, s, method="best")
