"""CDS Hooks ``patient-view`` for AF, end to end: a tiny 1D ResNet package, PhysioNet 2017
records written as FHIR Observations (``valueSampledData``), a signed call → an AF card
(schema-checked) on the patient's latest ECG; 412 and no-card paths."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from conftest import require_data
from meddx.modalities.ecg.fhir import record_to_observation
from meddx.modalities.ecg.io import read_wfdb
from meddx.serving.app import create_app
from meddx.serving.cds import validate_response
from meddx.serving.settings import ServeSettings
from serving_support import PUBLIC, Keys, cds_settings, token

SID = "af-tiny"
FOLDER = "ecg/physionet2017"


@pytest.fixture(scope="session")
def af_package(tmp_path_factory):
    """A small 1D ResNet trained for one epoch on 60 records per split (≈3-5 s; only the
    records used are read, no dataset-wide cache)."""
    require_data(f"{FOLDER}/REFERENCE.csv")
    from meddx.training import train

    return train(
        {"name": SID, "seed": 0,
         "data": {"dataset": "physionet2017", "limit": 60,
                  "options": {"cache": False, "fs": 100}},
         "model": {"name": "resnet1d", "options": {"layers": [1, 1, 1, 1],
                                                   "widths": [8, 8, 16, 16],
                                                   "stem_stride": 4}},
         "train": {"epochs": 1, "batch_size": 32, "early_stopping_patience": None,
                   "threads": 1}},
        out=tmp_path_factory.mktemp("af_run"), progress=False)


def _record(label: str) -> str:
    """The first record of REFERENCE.csv with ``label`` (A = AF, N = normal)."""
    ref = require_data(f"{FOLDER}/REFERENCE.csv")
    for line in ref.read_text().splitlines():
        rec, lab = line.strip().split(",")
        if lab == label:
            return rec
    raise AssertionError(f"no {label} record")


def ecg_observation(label: str, oid: str, when: str) -> dict:
    rec = read_wfdb(require_data(f"{FOLDER}/{_record(label)}.hea"))
    obs = record_to_observation(rec, subject="Patient/p-ecg")
    return {**obs, "id": oid, "effectiveDateTime": when}


@pytest.fixture(scope="module")
def af_obs() -> dict:
    return ecg_observation("A", "ecg-af", "2024-05-01T10:00:00Z")


@pytest.fixture(scope="module")
def old_obs() -> dict:
    return ecg_observation("N", "ecg-old", "2021-02-03T08:00:00Z")


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def settings(keys, tmp_path_factory) -> ServeSettings:
    tmp = tmp_path_factory.mktemp("cds_ecg")
    return cds_settings(keys, tmp)


@pytest.fixture(scope="module")
def client(af_package, settings):
    with TestClient(create_app([af_package.path], settings)) as c:
        yield c


def call(client, keys, prefetch: dict | None):
    body = {"hook": "patient-view", "hookInstance": "0b0e5a52-8f0d-4a53-a4f7-0d3b8e5c1a11",
            "context": {"userId": "Practitioner/1", "patientId": "p-ecg"}}
    if prefetch is not None:
        body["prefetch"] = prefetch
    tok = token(keys.ec, f"{PUBLIC}/cds-services/{SID}")
    return client.post(f"/cds-services/{SID}", json=body,
                       headers={"Authorization": f"Bearer {tok}"})


def searchset(*resources: dict) -> dict:
    return {"resourceType": "Bundle", "type": "searchset",
            "entry": [{"resource": r} for r in resources]}


@pytest.mark.slow
def test_af_card_on_the_latest_ecg(client, keys, af_package, af_obs, old_obs):
    from meddx.inference import load_model

    r = call(client, keys, {"ecg": searchset(old_obs, af_obs)})
    assert r.status_code == 200, r.text
    validate_response(r.json())
    [card] = r.json()["cards"]
    [expected] = load_model(af_package.path).predict([af_obs])  # the latest ECG is assessed
    p_af = (expected.calibrated or expected.probabilities)["af"]
    s = card["summary"]
    assert len(s) < 140 and s.startswith(f"{SID} v{af_package.card.version}: ")
    assert "atrial fibrillation" in s and f"AF {p_af:.0%}" in s
    verdict = "likely" if expected.decision == "af" else "not detected"
    assert f"atrial fibrillation {verdict}" in s
    assert f"| af | {p_af:.1%} |" in card["detail"]
    assert "ECG: the latest waveform Observation (2024-05-01T10:00)" in card["detail"]
    assert "Record assessed:" in card["detail"] and "300 Hz resampled to 100 Hz" in card["detail"]
    assert "Windows:" not in card["detail"]  # reader internals stay off the card
    if card["indicator"] == "info":
        assert expected.decision != "af" and not expected.refer
    for sugg in card.get("suggestions", []):
        assert sugg["label"] == "Request expert review of this ECG"
        assert sugg["actions"][0]["resource"]["subject"] == {"reference": "Patient/p-ecg"}


@pytest.mark.slow
def test_no_ecg_gives_no_card_and_missing_prefetch_is_412(client, keys):
    r = call(client, keys, {"ecg": None})
    assert r.status_code == 200 and r.json() == {"cards": []}
    assert call(client, keys, None).status_code == 412


@pytest.mark.slow
def test_unreadable_ecg_gives_no_card(client, keys, af_obs, settings):
    broken = {**af_obs, "component": [{**af_obs["component"][0], "valueSampledData": {
        **af_obs["component"][0]["valueSampledData"], "dimensions": 2}}]}
    r = call(client, keys, {"ecg": searchset(broken)})
    assert r.status_code == 200 and r.json() == {"cards": []}
    assert "no card" in settings.audit_log.read_text().splitlines()[-1]
