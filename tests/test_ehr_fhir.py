"""PhysioNet stay ↔ FHIR R4B: validation, the round trip, bad FHIR inputs, RiskAssessment."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from conftest import require_data
from meddx.errors import DataError
from meddx.modalities.ehr.features import BINS, STATIC_NAMES, decode_values, layout
from meddx.modalities.ehr.fhir import (
    physionet_to_bundle,
    risk_assessment,
    risk_band,
    stay_from_fhir,
)
from meddx.modalities.ehr.io import series_variables
from meddx.modalities.ehr.modality import EHRModality

STAYS = ["set-a/132539.txt", "set-a/132570.txt", "set-b/142731.txt"]


@pytest.fixture(scope="module")
def spec() -> dict:
    """An input_spec with neutral statistics (what read() needs; no training required)."""
    names = series_variables()
    lay = layout(len(names))
    stats = {"series": {n: [0.0, 1.0] for n in names}, "age": [60.0, 15.0],
             "height": [170.0, 10.0]}
    return {"format": "physionet2012-hourly", "variables": names, "static": STATIC_NAMES,
            "layout": lay, "channels": lay["valid"][1], "length": BINS, "stats": stats,
            "on_malformed": "warn", "min_train_hours": 6}


@pytest.fixture(scope="module")
def stay_path():
    return require_data("ehr/physionet2012/" + STAYS[0])


@pytest.fixture(scope="module")
def bundle(stay_path) -> dict:
    return physionet_to_bundle(stay_path)


def test_bundle_validates_with_fhir_resources_r4b(bundle):
    from fhir.resources.R4B.bundle import Bundle

    parsed = Bundle.model_validate(bundle)
    kinds = [e.resource.__resource_type__ for e in parsed.entry]
    assert kinds[:2] == ["Patient", "Encounter"] and set(kinds[2:]) == {"Observation"}
    enc = bundle["entry"][1]["resource"]
    assert enc["period"]["start"].startswith("2012-01-01T00:00")
    assert enc["type"][0]["coding"][0]["code"] == "4"
    obs = [e["resource"] for e in bundle["entry"][2:]]
    assert all(o["valueQuantity"]["system"] == "http://unitsofmeasure.org" for o in obs)
    assert {o["code"]["coding"][0]["system"] for o in obs} == {"http://loinc.org"}


def test_round_trip_gives_the_same_tensor(spec):
    m = EHRModality()
    for rel in STAYS[:2]:
        path = require_data("ehr/physionet2012/" + rel)
        from_file = m.read(path, spec)
        b = physionet_to_bundle(path)
        from_fhir = m.read(b, spec)
        from_json_text = m.read(json.dumps(b), spec)
        assert torch.equal(from_file.tensor, from_fhir.tensor), rel
        assert torch.equal(from_fhir.tensor, from_json_text.tensor)
        assert from_file.meta["hours_used"] == from_fhir.meta["hours_used"]
        assert from_fhir.meta["n_observations"] == len(from_fhir.meta["basis"])
        assert from_fhir.meta["patient"].startswith("urn:uuid:")


def test_cds_prefetch_with_prediction_time(bundle, spec):
    res = [e["resource"] for e in bundle["entry"]]
    obs = {"resourceType": "Bundle", "type": "searchset",
           "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in res[2:]]}
    prefetch = {"patient": res[0], "encounter": res[1], "observations": obs,
                "prediction_time": "2012-01-01T12:30:00+00:00"}
    s = EHRModality().read(prefetch, spec)
    assert s.meta["hours_used"] == 13
    later = [i for i in s.meta["ignored"] if "after the prediction time" in i["reason"]]
    assert later and s.meta["n_observations"] + len(later) == len(res) - 3  # Patient, Encounter, Age
    assert s.tensor[-1].sum() == 13
    assert s.meta["patient"] == f"Patient/{res[0]['id']}"


def _without(bundle: dict, kind: str) -> dict:
    b = copy.deepcopy(bundle)
    b["entry"] = [e for e in b["entry"] if e["resource"]["resourceType"] != kind]
    return b


def test_bundle_without_patient(bundle, spec):
    with pytest.raises(DataError, match="no Patient"):
        EHRModality().read(_without(bundle, "Patient"), spec)
    with pytest.raises(DataError, match="no Encounter"):
        EHRModality().read(_without(bundle, "Encounter"), spec)


def _obs(code: str, value: float, unit: str, when: str, system: str = "http://loinc.org") -> dict:
    return {"fullUrl": f"urn:uuid:{code}-{when}", "resource": {
        "resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": system, "code": code}]},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org",
                          "code": unit}}}


def _small(bundle: dict, *extra: dict) -> dict:
    b = copy.deepcopy(bundle)
    b["entry"] = b["entry"][:2] + [_obs("8867-4", 90, "/min", "2012-01-01T01:10:00Z"),
                                   *extra]
    return b


def test_unknown_code_is_ignored_and_listed(bundle, spec):
    s = EHRModality().read(_small(bundle, _obs("99999-9", 1, "1", "2012-01-01T02:00:00Z")), spec)
    assert s.meta["n_observations"] == 1
    [item] = s.meta["ignored"]
    assert item["reason"].startswith("unknown code") and "99999-9" in item["item"]


def test_units_convert_or_are_listed(bundle, spec):
    m = EHRModality()
    lactate_mg = _obs("2524-7", 18.016, "mg/dL", "2012-01-01T01:20:00Z")   # 2.0 mmol/L
    temp_f = _obs("8310-5", 98.6, "[degF]", "2012-01-01T01:30:00Z")        # 37 °C
    s = m.read(_small(bundle, lactate_mg, temp_f), spec)
    v = series_variables()
    assert s.meta["ignored"] == []
    raw = decode_values(s.tensor.numpy(), spec["stats"])  # back in PhysioNet units
    assert raw[v.index("Lactate"), 1] == pytest.approx(2.0, rel=1e-3)
    celsius = m.read(_small(bundle, _obs("2524-7", 2.0, "mmol/L", "2012-01-01T01:20:00Z"),
                            _obs("8310-5", 37.0, "Cel", "2012-01-01T01:30:00Z")), spec)
    torch.testing.assert_close(s.tensor, celsius.tensor)
    bad = _obs("2524-7", 2.0, "kg", "2012-01-01T01:20:00Z")
    s = m.read(_small(bundle, bad), spec)
    [item] = s.meta["ignored"]
    assert "unit 'kg' does not convert" in item["reason"]
    assert float(s.tensor[len(v) + v.index("Lactate")].sum()) == 0  # not used
    with pytest.raises(DataError, match="does not convert"):
        m.read(_small(bundle, bad), {**spec, "on_malformed": "error"})


def test_times_outside_the_window_are_listed(bundle, spec):
    before = _obs("2524-7", 2.0, "mmol/L", "2011-12-31T20:00:00Z")
    after = _obs("2524-7", 3.0, "mmol/L", "2012-01-03T02:00:00Z")  # 50 h
    s = EHRModality().read(_small(bundle, before, after), spec)
    reasons = sorted(i["reason"] for i in s.meta["ignored"])
    assert reasons == ["outside the window: after the first 48 h",
                       "outside the window: before ICU admission"]
    assert s.meta["hours_used"] == 2 and s.meta["n_observations"] == 1


def test_no_observations_cannot_be_assessed(bundle, spec, tmp_path):
    b = copy.deepcopy(bundle)
    b["entry"] = b["entry"][:2]
    with pytest.raises(DataError, match="cannot assess"):
        EHRModality().read(b, spec)
    path = require_data("ehr/physionet2012/" + STAYS[2])  # descriptors only
    with pytest.raises(DataError, match="cannot assess"):
        EHRModality().read(path, spec)


class _Card:
    name, version, modality, research_only = "icu-test", "1.0.0", "ehr", True
    network = {"name": "grud"}
    operating_points: dict = {}
    preprocessing = {"risk_bands": {"low_below": 0.1, "high_from": 0.3}}

    class task:  # noqa: N801 - mimics ModelCard.task
        positive_class = "died"


def test_risk_assessment_validates(bundle, spec):
    from fhir.resources.R4B.riskassessment import RiskAssessment

    from meddx.inference.prediction import Prediction

    s = EHRModality().read(bundle, spec)
    pred = Prediction(id=s.id, probabilities={"survived": 0.6, "died": 0.4}, label="survived",
                      calibrated={"survived": 0.78, "died": 0.22},
                      notes={k: s.meta[k] for k in ("hours_used", "basis", "patient",
                                                     "encounter")})
    ra = EHRModality().to_fhir(pred, _Card())
    RiskAssessment.model_validate(ra)
    p = ra["prediction"][0]
    assert p["probabilityDecimal"] == 0.22
    assert p["qualitativeRisk"]["coding"][0]["code"] == "moderate"
    assert len(ra["basis"]) == s.meta["n_observations"]
    assert ra["subject"]["reference"] == s.meta["patient"]
    assert "48 h" in p["rationale"] and "Research use only" in ra["note"][0]["text"]
    bare = Prediction(id="x", probabilities={"survived": 0.95, "died": 0.05}, label="survived")
    RiskAssessment.model_validate(risk_assessment(bare, _Card()))
    assert risk_band(0.05, _Card())[0] == "low" and risk_band(0.5, _Card())[0] == "high"


def test_cli_export(stay_path):
    from typer.testing import CliRunner

    from meddx.cli import app

    result = CliRunner().invoke(app, ["fhir", "export-physionet2012", str(stay_path),
                                      "--indent", "0"])
    assert result.exit_code == 0, result.output
    b = json.loads(result.stdout)
    assert b["resourceType"] == "Bundle" and len(b["entry"]) == 270


def test_fast_path_reads_a_large_prefetch(bundle):
    # speed is measured in benchmarks (timings do not belong in tests on a shared machine)
    big = copy.deepcopy(bundle)
    big["entry"] += copy.deepcopy(bundle["entry"][2:]) * 5  # ~1,600 Observations
    stay = stay_from_fhir(big)
    assert len(stay.events) == 6 * 267
    assert np.isfinite(stay.age)


def test_encoded_tensor_input_is_checked(stay_path, spec):
    from meddx.errors import InputMismatchError

    m = EHRModality()
    s = m.read(stay_path, spec)
    again = m.read(s.tensor.numpy(), spec)
    assert torch.equal(again.tensor, s.tensor) and again.meta["hours_used"] == 48
    with pytest.raises(InputMismatchError, match="shape"):
        m.read(np.zeros((10, 48), np.float32), spec)
    with pytest.raises(DataError, match="cannot assess"):
        m.read(np.zeros((spec["channels"], 48), np.float32), spec)
    with pytest.raises(InputMismatchError, match="not trained on ICU stays"):
        m.read(stay_path, {"format": "tabular"})
