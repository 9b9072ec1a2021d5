"""``meddx monitor``: the training reference in the card, PSI, live performance, and the
command on an audit log written by a real service run and on synthetic shifted logs."""

from __future__ import annotations

import csv
import json
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from meddx.errors import ConfigError, DataError
from meddx.monitoring.analysis import (
    _weighted_ece,
    analyse,
    drift_status,
    live_performance,
    parse_window,
)
from meddx.monitoring.logs import read_audit
from meddx.training.reference import (
    bin_counts,
    histogram,
    input_stats,
    psi,
    psi_null_quantile,
)
from serving_support import breast_png, get_package, live_server

NAME = "breast-tiny"


@pytest.fixture(scope="module")
def package(request):
    return get_package(request)


def _cli(args: list[str]):
    from meddx.cli import app

    return CliRunner().invoke(app, args)


# ------------------------------------------------------------ the reference
def test_card_reference_is_the_calibration_split(package):
    """Known answer: the stored histogram is the one of the calibrated calib risks."""
    from meddx.training import load_bundle
    from meddx.training.posthoc import probabilities, split_logits

    ref = package.card.reference
    assert ref is not None and ref.risk_of == "malignant" and ref.fitted_on == "calib"
    calib = load_bundle(package.card.training["config"]).splits["calib"]
    assert ref.n == len(calib) == ref.n_inputs
    probs = probabilities(package.card, split_logits(package, calib))
    risk = probs[:, package.card.task.class_names.index("malignant")]
    again = histogram(risk)
    assert np.allclose(again.edges, ref.risk.edges, atol=1e-5)
    assert np.allclose(again.fractions, ref.risk.fractions)
    assert sum(ref.risk.fractions) == pytest.approx(1.0)
    from meddx.modalities import get_modality

    mod = get_modality("image")
    means = [input_stats(mod.item_tensor(x, package.card.preprocessing))["mean"]
             for x in calib.inputs]
    assert ref.inputs["mean"].mean == pytest.approx(float(np.mean(means)), rel=1e-5)
    assert set(ref.inputs) == {"mean", "std", "extreme"}


def test_input_stats_known_values():
    x = np.array([[0.0, 0.0, 0.5, 1.0]], dtype=np.float32)
    s = input_stats(x)
    assert s == pytest.approx({"mean": 0.375, "std": float(np.std(x)), "extreme": 0.75})
    assert input_stats(np.full(4, 3.0))["extreme"] == 1.0
    assert input_stats({"not": "a tensor"}) is None
    assert input_stats(np.array([np.nan, 1.0, 2.0]))["mean"] == pytest.approx(1.5)


# ------------------------------------------------------------- statistics
def test_psi_known_values():
    assert psi([0.5, 0.5], 1000, [500, 500]) == pytest.approx(0.0)
    a = np.array([900.5, 100.5]) / 1001
    e = np.array([500.5, 500.5]) / 1001
    assert psi([0.5, 0.5], 1000, [900, 100]) == pytest.approx(float(np.sum((a - e) *
                                                                          np.log(a / e))))
    assert np.isnan(psi([0.5, 0.5], 1000, [0, 0]))
    small, large = (psi_null_quantile([0.25] * 4, 100, n) for n in (20, 2000))
    assert small > large > 0
    assert list(bin_counts([0.2, 0.5], [0.1, 0.2, 0.3, 0.9, np.nan])) == [2, 1, 1]


def test_drift_status_follows_the_convention():
    assert drift_status(0.05, 0.02, 500) == "stable"
    assert drift_status(0.2, 0.05, 500) == "moderate"
    assert drift_status(0.4, 0.05, 500) == "major"
    assert drift_status(0.4, 0.6, 12) == "noise"
    assert drift_status(float("nan"), 0.1, 0) == "no data"


def test_weighted_ece_equals_the_point_estimate():
    from meddx.statistics.calibration import expected_calibration_error

    rng = np.random.default_rng(0)
    r = rng.uniform(size=300)
    y = (rng.uniform(size=300) < r ** 2).astype(int)
    point = expected_calibration_error(y, np.column_stack([1 - r, r]), positive_index=1)
    assert _weighted_ece(y, r, np.ones((1, 300)))[0] == pytest.approx(point)


def test_live_performance_known_answers():
    perfect = live_performance([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], n_resamples=200)
    assert perfect["auroc"]["value"] == 1.0 and perfect["auroc"]["low"] == 1.0
    assert perfect["ece"]["value"] == pytest.approx(0.15)
    assert perfect["observed_rate"] == 0.5 and perfect["mean_risk"] == pytest.approx(0.5)
    one_class = live_performance([1, 1, 1], [0.2, 0.5, 0.9], n_resamples=50)
    assert np.isnan(one_class["auroc"]["value"]) and one_class["notes"]


def test_window_specs():
    assert parse_window("1d").seconds == 86400 and parse_window("1w").seconds == 604800
    assert parse_window("12h").seconds == 43200 and parse_window("500").count == 500
    for bad in ("0", "soon", "1y", "-3"):
        with pytest.raises(ConfigError):
            parse_window(bad)


# ------------------------------------------------------- synthetic logs
def _from_reference(hist, rng, n: int, shift: float = 0.0) -> np.ndarray:
    """Values falling in the reference's bins with the reference's shares (+ ``shift``)."""
    e = np.asarray(hist.edges)
    mids = np.concatenate([[e[0] - 1e-3], (e[:-1] + e[1:]) / 2, [e[-1] + 1e-3]])
    return mids[rng.choice(len(mids), size=n, p=np.asarray(hist.fractions))] + shift


def _line(t: datetime, rid: str, risk: float, stats: dict, sha: str) -> str:
    r = float(np.clip(risk, 0, 1))
    out = {"label": "malignant" if r >= 0.5 else "normal, benign",
           "decision": "malignant" if r >= 0.3 else "not malignant",
           "calibrated": {"malignant": r, "normal, benign": 1 - r},
           "probabilities": {"malignant": r, "normal, benign": 1 - r}}
    return json.dumps({"time": t.isoformat(), "event": "predict",
                       "route": "/v1/models/{name}/predict", "status": 200,
                       "model": {"name": NAME, "version": "1.0.0", "sha256": sha},
                       "inputs": ["0" * 64], "outputs": [out], "input_stats": [stats],
                       "request_id": rid})


def _synthetic_log(path: Path, package, days: list[float], n: int = 1500) -> None:
    """One day of ``n`` answers per entry of ``days``: the risk and input mean shifted by it."""
    ref = package.card.reference
    rng = np.random.default_rng(1)
    t0 = datetime(2026, 3, 2, tzinfo=UTC)
    lines = []
    for d, shift in enumerate(days):
        risk = _from_reference(ref.risk, rng, n, shift)
        stats = {k: _from_reference(ref.inputs[k], rng, n, shift if k == "mean" else 0.0)
                 for k in ref.inputs}
        for i in range(n):
            t = t0 + timedelta(days=d, seconds=i * 50)
            lines.append(_line(t, f"r{d}-{i}", risk[i], {k: float(v[i]) for k, v in
                                                         stats.items()}, package.sha256))
    path.write_text("\n".join(lines) + "\n")


def test_psi_flags_a_shifted_day_and_not_the_unshifted_ones(package, tmp_path):
    log = tmp_path / "audit.jsonl"
    _synthetic_log(log, package, [0.0, 0.3, 0.0])
    result = analyse(read_audit(log), [package], window="1d", bootstrap=0)
    (m,) = result["models"]
    status = [w["risk"]["status"] for w in m["windows"]]
    assert status == ["stable", "major", "stable"], [w["risk"]["psi"] for w in m["windows"]]
    assert [w["inputs"]["mean"]["status"] for w in m["windows"]] == ["stable", "major",
                                                                      "stable"]
    assert m["windows"][1]["risk"]["psi"] > 0.25 > 0.1 > m["windows"][0]["risk"]["psi"]
    days = {f.split("[")[1].split("]")[0] for f in result["flags"]}
    assert days <= {"2026-03-03", "all"} and "2026-03-03" in days


def test_unshifted_log_has_no_flags(package, tmp_path):
    log = tmp_path / "audit.jsonl"
    _synthetic_log(log, package, [0.0, 0.0])
    result = analyse(read_audit(log), [package], window="1d", bootstrap=0)
    assert result["flags"] == []
    assert all(w["risk"]["psi"] < 0.1 for w in result["models"][0]["windows"])


def test_malformed_lines_are_counted_not_fatal(package, tmp_path):
    log = tmp_path / "audit.jsonl"
    _synthetic_log(log, package, [0.0], n=20)
    with log.open("ab") as f:
        f.write(b"not json\n\xff\xfe binary\n[1, 2]\n\n")
        f.write(b'{"time": "yesterday", "event": "predict"}\n')
        f.write(b'{"time": "2026-03-02T10:00:00+00:00", "event": "predict"}\n')
        f.write(b'{"time": "2026-03-02T10:00:00+00:00", "event": "predict", '
                b'"model": {"name": "breast-tiny"}, "outputs": "x"}\n')
    data = read_audit(log)
    assert len(data.answered) == 20
    assert data.skipped.counts == {"not JSON": 2, "not a JSON object": 1, "empty line": 1,
                                   "no valid time": 1,
                                   "predict line without a model name": 1,
                                   "predict line without a list of outputs": 1}
    assert data.skipped.lines["not JSON"] == [21, 22]
    r = _cli(["monitor", str(log), "--package", str(package.path), "--out",
              str(tmp_path / "rep"), "--bootstrap", "0"])
    assert r.exit_code == 0, r.output
    assert "7 malformed lines skipped" in " ".join(r.output.split())
    saved = json.loads((tmp_path / "rep" / "monitor.json").read_text())
    assert saved["skipped"]["total"] == 7


def test_old_package_without_reference_still_reports(package, tmp_path):
    """A card written before the ``reference`` field existed loads; monitor says so."""
    from meddx.package import CARD, MANIFEST, load_package, sha256_file

    old = tmp_path / "old"
    shutil.copytree(package.path, old)
    card = json.loads((old / CARD).read_text())
    card.pop("reference")
    (old / CARD).write_text(json.dumps(card))
    manifest = json.loads((old / MANIFEST).read_text())
    manifest[CARD] = sha256_file(old / CARD)
    (old / MANIFEST).write_text(json.dumps(manifest))
    pkg = load_package(old)
    assert pkg.card.reference is None
    log = tmp_path / "audit.jsonl"
    _synthetic_log(log, package, [0.0], n=50)
    (m,) = analyse(read_audit(log), [pkg], bootstrap=0)["models"]
    assert any("no training reference" in n for n in m["notes"])
    assert m["overall"]["answers"] == 50 and m["overall"]["risk"]["n"] == 50
    assert "psi" not in m["overall"]["risk"]
    from meddx.training.posthoc import add_reference

    again = add_reference(old).card.reference  # refitted from the run's own calib split
    assert again == package.card.reference


def test_outcomes_csv_without_its_columns_is_a_data_error(package, tmp_path):
    log = tmp_path / "audit.jsonl"
    _synthetic_log(log, package, [0.0], n=5)
    bad = tmp_path / "outcomes.csv"
    bad.write_text("id,label\nx,1\n")
    r = _cli(["monitor", str(log), "--outcomes", str(bad), "--out", str(tmp_path / "o")])
    assert isinstance(r.exception, DataError) and "request_id" in str(r.exception)


# ------------------------------------------------- a real service's log
def _brighter(npz: Path, index: int) -> bytes:
    import io

    from PIL import Image

    with np.load(npz) as d:
        img = d["test_images"][index].astype(int)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img + 110, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_monitor_on_a_real_service_run(package, breast_npz, tmp_path):
    """16 test images, then 16 brightened ones, through a real server; outcomes joined by the
    X-Request-ID answers; CDS feedback through the service's FeedbackStore."""
    from meddx.serving.app import create_app
    from meddx.serving.auth import new_api_key
    from meddx.serving.cds import FeedbackRequest, FeedbackStore
    from meddx.serving.settings import ServeSettings

    token, digest = new_api_key("monitor")
    settings = ServeSettings(api_keys={"monitor": digest}, research_use=True, warmup=False,
                             audit_log=tmp_path / "audit.jsonl")
    with np.load(breast_npz) as d:
        labels = d["test_labels"].reshape(-1)[:16]
    names = package.card.task.class_names
    rows = []
    with live_server(create_app([package.path], settings)) as base, httpx.Client() as c:
        for shifted in (False, True):
            for i in range(16):
                png = _brighter(breast_npz, i) if shifted else breast_png(breast_npz, i)
                r = c.post(f"{base}/v1/models/{NAME}/predict", timeout=30,
                           headers={"Authorization": f"Bearer {token}"},
                           files={"file": ("x.png", png, "image/png")})
                assert r.status_code == 200, r.text
                rows.append((r.headers["x-request-id"], names[int(labels[i])]))
    with (tmp_path / "outcomes.csv").open("w", newline="") as f:  # "normal, benign": quoted
        csv.writer(f).writerows([("request_id", "outcome"), *rows,
                                 ("not-a-request", "malignant")])
    store = FeedbackStore(tmp_path / "cds-feedback.jsonl")
    now = datetime.now(UTC).isoformat()
    body = FeedbackRequest.model_validate({"feedback": [
        {"card": f"c{i}", "outcome": o, "outcomeTimestamp": now}
        for i, o in enumerate(("accepted", "accepted", "overridden"))]})
    store.add(NAME, body, {"kind": "jwt"})
    with (tmp_path / "audit.jsonl").open("a") as f:
        f.write("{truncated\n")
    r = _cli(["monitor", str(tmp_path / "audit.jsonl"), "--package", str(package.path),
              "--outcomes", str(tmp_path / "outcomes.csv"), "--window", "16",
              "--bootstrap", "200", "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "rep" / "monitor.json").read_text())
    (m,) = result["models"]
    assert result["skipped"]["total"] == 1 and result["answers"] == 32
    assert m["outcomes"] == {"joined": 32, "not_joined": {
        "request id not in the log (or another model)": 1}}
    perf = m["overall"]["performance"]
    assert perf["n"] == 32 and perf["positives"] == int((labels == 0).sum()) * 2
    assert perf["auroc"]["low"] <= perf["auroc"]["value"] <= perf["auroc"]["high"]
    first, second = m["windows"]
    assert first["answers"] == second["answers"] == 16
    assert second["inputs"]["mean"]["status"] == "major"
    assert second["inputs"]["mean"]["shift_sd"] > first["inputs"]["mean"]["shift_sd"] + 3
    assert any("input mean" in f and "#2" in f for f in result["flags"])
    cds = m["overall"]["cds"]
    assert (cds["accepted"], cds["overridden"]) == (2, 1)
    assert cds["acceptance"]["value"] == pytest.approx(2 / 3)
    html = (tmp_path / "rep" / "monitor.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
    assert not re.search(r"\b(nan|none)\b", re.sub(r"base64,[^\"]+", "", html), re.I)
