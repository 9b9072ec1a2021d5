"""``--operating-point NAME`` per deployment: ``meddx predict`` and ``meddx serve`` decide at
the named point of the card (Prediction, CSV, FHIR RiskAssessment, the models list), an
unknown name is a ConfigError listing the card's points; the reader's dropped lines reach the
prediction's JSON, a warning line, and refused stays are CSV rows with their reason."""

from __future__ import annotations

import csv
import io
import json

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from icu_support import clean_body, icu_package, write_stay
from meddx.cli import app
from meddx.errors import ConfigError
from meddx.serving.app import create_app
from meddx.serving.settings import ServeSettings, parse_operating_points

runner = CliRunner()

# everyone is an alert at the default point, nobody at "balanced": the rule in use shows
POINTS = {
    "sensitivity@0.8": {"method": "sensitivity", "target": 0.8, "threshold": 0.0,
                        "calib_sensitivity": 1.0, "calib_specificity": 0.0},
    "balanced": {"method": "balanced", "threshold": 1.0 + 1e-9, "calib_sensitivity": 0.0,
                 "calib_specificity": 1.0, "calib_ppv": 0.0},
}


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return icu_package(tmp_path_factory.mktemp("icu_pkg"), POINTS, default="sensitivity@0.8")


@pytest.fixture(scope="module")
def stays(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stays")
    write_stay(folder, 400001, clean_body(90))
    # two lines the reader must leave out and count: an empty parameter name, a bad value
    write_stay(folder, 400002, clean_body(110) + "10:45,,1.9\n11:00,HR,abc\n")
    # nothing usable: refused, with its reason
    write_stay(folder, 400003, "01:00,,1.9\n02:00,Foo,3\n", weight=-1)
    return folder


def predict(*args: str):
    return runner.invoke(app, ["predict", *map(str, args)])


def test_predict_decides_at_the_operating_point_asked_for(package, stays):
    good = [stays / "400001.txt", stays / "400002.txt"]
    default = json.loads(predict(package.path, *good, "--format", "json").stdout)
    assert {p["decision"] for p in default["predictions"]} == {"died"}
    assert {p["operating_point"] for p in default["predictions"]} == {"sensitivity@0.8"}
    r = predict(package.path, *good, "--format", "json", "--operating-point", "balanced")
    assert r.exit_code == 0, r.output
    preds = json.loads(r.stdout)["predictions"]
    assert {p["decision"] for p in preds} == {"not died"}
    assert {(p["operating_point"], p["threshold"]) for p in preds} == {("balanced", 1.0 + 1e-9)}


def test_unknown_operating_point_is_a_config_error_listing_the_card(package, stays):
    r = predict(package.path, stays / "400001.txt", "--operating-point", "balance")
    assert isinstance(r.exception, ConfigError)
    assert "did you mean 'balanced'" in r.exception.message
    assert "sensitivity@0.8, balanced" in r.exception.hint


def test_dropped_lines_in_json_warning_and_csv_with_refused_rows(package, stays):
    r = predict(package.path, stays, "--format", "json")
    assert r.exit_code == 1  # one stay refused
    data = json.loads(r.stdout)
    by_id = {p["id"]: p for p in data["predictions"]}
    assert by_id["400002"]["notes"]["dropped_lines"] == {
        "total": 2, "by_reason": {"empty_parameter": 1, "unparsable_value": 1}}
    assert by_id["400001"]["notes"]["dropped_lines"] == {"total": 0, "by_reason": {}}
    assert "warning: 2 input lines left out in 1 of 2 predicted inputs" in r.stderr
    assert "empty parameter 1" in r.stderr and "1 input(s) refused" in r.stderr
    [refused] = data["errors"]
    assert refused["id"] == "400003.txt" and "cannot assess" in refused["error"]
    assert "empty parameter name: 1" in refused["error"]

    rows = list(csv.DictReader(io.StringIO(predict(package.path, stays, "--format", "csv",
                                                   "--operating-point", "balanced").stdout)))
    assert [r["id"] for r in rows] == ["400001", "400002", "400003.txt"]
    assert [r["dropped_lines"] for r in rows[:2]] == ["0", "2"]
    assert rows[0]["decision"] == "not died" and rows[0]["error"] == ""
    assert rows[2]["decision"] == "" and "cannot assess" in rows[2]["error"]


def _client(package, **points: str) -> TestClient:
    settings = ServeSettings(insecure_no_auth=True, research_use=True, warmup=False,
                             operating_points=points)
    return TestClient(create_app([package.path], settings))


def _predict(client: TestClient, bundle: dict, fmt: str = "json"):
    r = client.post(f"/v1/models/icu-tiny/predict?format={fmt}", json=bundle)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def bundle(stays) -> dict:
    """The stay as an EHR sends it (FHIR R4B Bundle) plus an Observation the model cannot use."""
    from meddx.modalities.ehr.fhir import physionet_to_bundle

    b = physionet_to_bundle(stays / "400001.txt")
    b["entry"].append({"fullUrl": "urn:uuid:obs-unknown", "resource": {
        "resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "99999-9"}]},
        "effectiveDateTime": "2012-01-01T01:00:00Z", "valueQuantity": {"value": 1}}})
    return b


def test_serve_decides_at_the_deployment_point(package, bundle):
    stay = bundle
    with _client(package) as c:
        [p] = _predict(c, stay)["predictions"]
        assert (p["decision"], p["operating_point"]) == ("died", "sensitivity@0.8")
        assert p["notes"]["dropped_lines"] == {"total": 1, "by_reason": {"unknown_code": 1}}
    with _client(package, **{"*": "balanced"}) as c:
        [p] = _predict(c, stay)["predictions"]
        assert (p["decision"], p["operating_point"]) == ("not died", "balanced")
        [model] = c.get("/v1/models").json()["models"]
        assert model["operating_point"] == "balanced"
        ra = [e["resource"] for e in _predict(c, stay, "fhir")["entry"]
              if e["resource"]["resourceType"] == "RiskAssessment"][0]
        assert any("No alert" in n["text"] and "operating point balanced" in n["text"]
                   for n in ra["note"])
    with _client(package, **{"icu-tiny": "balanced", "*": "sensitivity@0.8"}) as c:
        [p] = _predict(c, stay)["predictions"]
        assert p["operating_point"] == "balanced"  # the named model's entry wins


def test_serve_refuses_unknown_points_and_models(package):
    with pytest.raises(ConfigError, match="no operating point 'youden'") as e:
        create_app([package.path], ServeSettings(insecure_no_auth=True, research_use=True,
                                                 operating_points={"*": "youden"}))
    assert "sensitivity@0.8, balanced" in e.value.hint
    with pytest.raises(ConfigError, match="not served: icu"):
        create_app([package.path], ServeSettings(insecure_no_auth=True, research_use=True,
                                                 operating_points={"icu": "balanced"}))
    assert parse_operating_points(["balanced", "icu=sensitivity@0.8"]) == {
        "*": "balanced", "icu": "sensitivity@0.8"}
    with pytest.raises(ConfigError):
        parse_operating_points(["icu="])
    with pytest.raises(ConfigError):
        parse_operating_points(["balanced", "youden"])


def test_serve_command_passes_the_point(package, monkeypatch):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app))
    r = runner.invoke(app, ["serve", str(package.path), "--insecure-no-auth", "--research-use",
                            "--operating-point", "icu-tiny=balanced"])
    assert r.exit_code == 0, r.output
    served = seen["app"].state.meddx.hub.models["icu-tiny"]
    assert served.predictor.operating_point_name == "balanced"
