"""ECG in FHIR R4B: waveform Observations (SampledData) in and out, rhythm Observations."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fhir.resources.R4B.observation import Observation

from conftest import require_data
from meddx.errors import DataError
from meddx.inference.prediction import Prediction
from meddx.modalities import get_modality
from meddx.modalities.ecg.fhir import latest_waveform, observation_to_record, record_to_observation
from meddx.modalities.ecg.io import read_wfdb
from meddx.package import ModelCard
from meddx.tasks import TaskSpec

SPEC = {"leads": ["ECG"], "fs": 150.0, "length": 1500, "stride": 750, "min_seconds": 5.0,
        "channels": 1}


@pytest.fixture(scope="module")
def a00005() -> Path:
    return require_data("ecg/physionet2017") / "A00005.hea"


def test_round_trip_wfdb_to_observation_to_tensor_equals_wfdb_to_tensor(a00005: Path) -> None:
    ecg = get_modality("ecg")
    obs = record_to_observation(read_wfdb(a00005), subject="Patient/example")
    Observation.model_validate(obs)  # a valid R4B resource
    comp = obs["component"][0]
    assert comp["code"]["text"] == "ECG" and comp["valueSampledData"]["dimensions"] == 1
    assert comp["valueSampledData"]["period"] == pytest.approx(1000 / 300)
    wire = json.loads(json.dumps(obs))  # as it would travel
    direct = ecg.read(a00005, SPEC)
    via_fhir = ecg.read(wire, SPEC)
    assert via_fhir.tensor.shape == direct.tensor.shape == (11, 1, 1500)
    torch.testing.assert_close(via_fhir.tensor, direct.tensor, atol=1e-5, rtol=0)
    # the physical values survive exactly (ADC integers + factor + origin)
    back = observation_to_record(wire)
    np.testing.assert_allclose(back.signal, read_wfdb(a00005).signal, atol=1e-12)


def test_multilead_round_trip_keeps_lead_names_and_codes() -> None:
    full = read_wfdb(require_data("ecg/wfdb") / "s0010_re.hea")
    rec = dataclasses.replace(full, signal=full.signal[:2000], digital=full.digital[:2000])
    obs = record_to_observation(rec)
    codes = {c["code"]["text"]: c["code"].get("coding", [{}])[0].get("code")
             for c in obs["component"]}
    assert codes["i"] == "131329" and codes["ii"] == "131330" and codes["iii"] == "131389"
    assert codes["vx"] is None  # Frank leads have no MDC lead code here: text only
    back = observation_to_record(obs)
    assert back.leads == rec.leads and back.fs == 1000
    np.testing.assert_allclose(back.signal, rec.signal, atol=1e-12)


def _tiny_observation() -> dict:
    return {
        "resourceType": "Observation", "status": "final", "code": {"text": "ECG"},
        "component": [{"code": {"text": "II"}, "valueSampledData": {
            "origin": {"value": 0, "unit": "mV"}, "period": 4, "factor": 0.01,
            "dimensions": 1, "data": " ".join(str(v) for v in range(2000))}}],
    }


def test_sampled_data_whose_dimensions_disagree_with_the_data() -> None:
    obs = _tiny_observation()
    obs["component"][0]["valueSampledData"]["dimensions"] = 3  # 2000 values, not 3 per time
    with pytest.raises(DataError, match="dimensions=3 disagrees with the data"):
        observation_to_record(obs)
    obs["component"][0]["valueSampledData"]["dimensions"] = 2  # 2 interleaved leads: fine
    rec = observation_to_record(obs)
    assert rec.leads == ["II1", "II2"] and rec.signal.shape == (1000, 2) and rec.fs == 250


def test_sampled_data_without_period_or_with_error_codes() -> None:
    obs = _tiny_observation()
    del obs["component"][0]["valueSampledData"]["period"]
    with pytest.raises(DataError, match="sampling rate is absent"):
        observation_to_record(obs)
    obs = _tiny_observation()
    obs["component"][0]["valueSampledData"]["data"] += " E"
    obs["component"][0]["valueSampledData"]["data"] = " ".join(
        obs["component"][0]["valueSampledData"]["data"].split()[1:])
    rec = observation_to_record(obs)
    assert np.isnan(rec.signal[-1, 0])
    with pytest.raises(DataError, match="NaN"):
        get_modality("ecg").read(obs, {**SPEC, "leads": ["II"]})
    with pytest.raises(DataError, match="no valueSampledData"):
        observation_to_record({"resourceType": "Observation", "status": "final",
                               "code": {"text": "x"}, "valueString": "sinus"})


def test_rhythm_observation_for_a_prediction() -> None:
    task = TaskSpec(kind="multiclass", class_names=["normal", "af", "other", "noisy"],
                    positive_class="af", label_values=["N", "A", "O", "~"])
    card = ModelCard(name="af-demo", modality="ecg", task=task,
                     network={"name": "resnet1d", "options": {}}, preprocessing=SPEC)
    pred = Prediction(id="x", probabilities={"normal": 0.1, "af": 0.8, "other": 0.05,
                                             "noisy": 0.05},
                      label="af", model={"sha256": "ab" * 32}, refer=True)
    obs = get_modality("ecg").to_fhir(pred, card)
    Observation.model_validate(obs)
    assert obs["code"]["coding"][0]["code"] == "8884-9"
    assert obs["valueCodeableConcept"]["coding"][0]["code"] == "49436004"  # atrial fibrillation
    probs = {c["code"]["text"]: c["valueQuantity"]["value"] for c in obs["component"]}
    assert probs["probability of af"] == pytest.approx(0.8)
    notes = " ".join(n["text"] for n in obs["note"])
    assert "Research use only" in notes and "refer" in notes
    other = copy.deepcopy(pred)
    other.label = "other"
    assert "coding" not in get_modality("ecg").to_fhir(other, card)["valueCodeableConcept"]


def test_latest_waveform_from_a_prefetch_bundle() -> None:
    old, new = _tiny_observation(), _tiny_observation()
    old["effectiveDateTime"], new["effectiveDateTime"] = "2024-01-01T10:00:00Z", "2025-03-01"
    wrong = {**_tiny_observation(), "status": "entered-in-error",
             "effectiveDateTime": "2026-01-01"}
    text = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "valueString": "sinus", "effectiveDateTime": "2027-01-01"}
    bundle = {"resourceType": "Bundle", "type": "searchset",
              "entry": [{"resource": r} for r in (old, text, wrong, new)]}
    assert latest_waveform(bundle) is new
    assert latest_waveform({"resourceType": "Bundle", "type": "searchset"}) is None
