"""Side inputs through the service (issue 24, point 2): the REST body and multipart field, CDS
Hooks with the FHIR Patient in the prefetch (age from birthDate, sex from gender), missing
values flagged, bad values a 422 with a reason, an image-only model unchanged."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from meddx.serving.app import create_app
from meddx.serving.auth import new_api_key
from meddx.serving.cds import validate_response
from serving_support import PUBLIC, Keys, cds_settings, token
from sideinputs_support import trained

SIDE, PLAIN = "derm-side", "derm-plain"


@pytest.fixture(scope="module")
def packages():
    side, data = trained(True)
    plain, _ = trained(False)
    return side, plain, data


@pytest.fixture(scope="module")
def png(packages) -> bytes:
    data = packages[2]
    table = pd.read_csv(data / "labels.csv")
    return Path(data / table[table.split == "test"].path.iloc[0]).read_bytes()


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def api_key() -> tuple[str, str]:
    return new_api_key("tester")


@pytest.fixture(scope="module")
def client(packages, keys, api_key, tmp_path_factory):
    settings = cds_settings(keys, tmp_path_factory.mktemp("side"),
                            api_keys={"tester": api_key[1]})
    with TestClient(create_app([packages[0].path, packages[1].path], settings)) as c:
        yield c


@pytest.fixture(scope="module")
def auth(api_key) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key[0]}"}


def _json(png: bytes, side=None, n: int = 1) -> dict:
    body: dict = {"inputs": [{"data": base64.b64encode(png).decode(),
                              "contentType": "image/png"}] * n}
    if side is not None:
        body["side_inputs"] = side
    return body


def _melanoma(r) -> list[float]:
    return [p["calibrated"]["melanoma"] for p in r.json()["predictions"]]


# ------------------------------------------------------------------ REST
def test_model_description_lists_its_side_inputs(client, auth) -> None:
    d = client.get(f"/v1/models/{SIDE}", headers=auth).json()
    by = {e["name"]: e for e in d["side_inputs"]}
    assert by["age"]["unit"] == "years" and by["sex"]["allowed"] == ["female", "male"]
    assert client.get(f"/v1/models/{PLAIN}", headers=auth).json()["side_inputs"] == []


def test_rest_body_side_inputs_change_the_answer_and_missing_is_flagged(client, auth, png):
    url = f"/v1/models/{SIDE}/predict"
    r = client.post(url, json=_json(png, [{"age": 82, "sex": "male"}, {"age": 18},
                                          None], n=3), headers=auth)
    assert r.status_code == 200, r.text
    old, young, unknown = r.json()["predictions"]
    assert old["calibrated"]["melanoma"] > young["calibrated"]["melanoma"]
    assert old["notes"]["side_inputs"] == {"used": {"age": 82.0, "sex": "male"}, "missing": [],
                                           "source": "request body"}
    assert young["notes"]["side_inputs"]["missing"] == ["sex"]
    assert unknown["notes"]["side_inputs"]["missing"] == ["age", "sex"]
    # one input: one object is enough
    one = client.post(url, json=_json(png, {"age": 82, "sex": "male"}), headers=auth)
    assert _melanoma(one) == pytest.approx([old["calibrated"]["melanoma"]], abs=1e-6)


def test_multipart_side_inputs_field(client, auth, png):
    r = client.post(f"/v1/models/{SIDE}/predict", headers=auth,
                    files={"file": ("a.png", png, "image/png")},
                    data={"side_inputs": json.dumps({"age": 30, "sex": "female"})})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["notes"]["side_inputs"]["used"] == {"age": 30.0,
                                                                           "sex": "female"}


@pytest.mark.parametrize("side, n, message", [
    ({"age": 200}, 1, "outside 0–120"),
    ({"sex": "robot"}, 1, "not one of its categories"),
    ({"agee": 50}, 1, "unknown side input 'agee'"),
    ([{"age": 50}], 2, "1 \"side_inputs\" records for 2 inputs"),
    ("age=50", 1, "must be an object or a list"),
])
def test_bad_side_inputs_are_422_with_a_reason(client, auth, png, side, n, message):
    r = client.post(f"/v1/models/{SIDE}/predict", json=_json(png, side, n), headers=auth)
    assert r.status_code == 422, r.text
    body = r.json()
    assert re.search(message, body["message"]) and body["hint"] and body["error"]


def test_multipart_field_that_is_not_json_is_422(client, auth, png):
    r = client.post(f"/v1/models/{SIDE}/predict", headers=auth,
                    files={"file": ("a.png", png, "image/png")}, data={"side_inputs": "{age"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["message"]


def test_image_only_model_refuses_side_inputs_and_answers_as_before(client, auth, png):
    url = f"/v1/models/{PLAIN}/predict"
    r = client.post(url, json=_json(png, {"age": 50}), headers=auth)
    assert r.status_code == 422 and "takes no side inputs" in r.json()["message"]
    r = client.post(url, json=_json(png), headers=auth)
    assert r.status_code == 200 and "side_inputs" not in r.json()["predictions"][0].get(
        "notes", {})


# ------------------------------------------------------------------ CDS Hooks
def _media(png: bytes) -> dict:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": {
        "resourceType": "Media", "id": "m1", "status": "completed",
        "createdDateTime": "2026-01-01",
        "content": {"contentType": "image/png", "data": base64.b64encode(png).decode()}}}]}


def _hook(client, keys, prefetch: dict, sid: str = SIDE):
    body = {"hook": "patient-view", "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
            "context": {"userId": "Practitioner/1", "patientId": "p-1"}, "prefetch": prefetch}
    tok = token(keys.ec, f"{PUBLIC}/cds-services/{sid}")
    r = client.post(f"/cds-services/{sid}", json=body, headers={"Authorization": f"Bearer {tok}"})
    assert r.status_code == 200, r.text
    validate_response(r.json())
    return r.json()["cards"]


def _patient(**fields) -> dict:
    return {"resourceType": "Patient", "id": "p-1", **fields}


def _age_on_today(born: str) -> int:
    b, t = datetime.fromisoformat(born).date(), datetime.now(UTC).date()
    return t.year - b.year - ((t.month, t.day) < (b.month, b.day))


def test_discovery_asks_for_the_patient_only_where_the_model_takes_side_inputs(client, keys):
    tok = token(keys.ec, f"{PUBLIC}/cds-services")
    services = {s["id"]: s for s in client.get(
        "/cds-services", headers={"Authorization": f"Bearer {tok}"}).json()["services"]}
    assert services[SIDE]["prefetch"]["patient"] == "Patient/{{context.patientId}}"
    assert "patient" not in services[PLAIN]["prefetch"]


def test_cds_takes_age_and_sex_from_the_fhir_patient(client, keys, png):
    born_old, born_young = "1941-03-02", "2004-11-20"
    (old,) = _hook(client, keys, {"media": _media(png), "documents": None,
                                  "patient": _patient(birthDate=born_old, gender="male")})
    (young,) = _hook(client, keys, {"media": _media(png), "documents": None,
                                    "patient": _patient(birthDate=born_young, gender="male")})
    assert f"age {_age_on_today(born_old)} years, sex male" in old["detail"]
    assert f"age {_age_on_today(born_young)} years" in young["detail"]
    assert born_old not in old["detail"]  # the age, never the birth date
    # the patient changed the model's answer, not only the lines naming the side inputs
    def answer(card: dict) -> str:
        return "\n".join(x for x in card["detail"].splitlines() if "ide inputs" not in x)

    assert answer(old) != answer(young)


def test_cds_flags_what_the_patient_lacks(client, keys, png):
    (card,) = _hook(client, keys, {"media": _media(png), "documents": None,
                                   "patient": _patient(gender="unknown")})
    assert "Side inputs from the FHIR Patient: none" in card["detail"]
    assert "Missing side inputs (flagged to the model, not imputed): age, sex" in card["detail"]
    (card,) = _hook(client, keys, {"media": _media(png), "documents": None, "patient": None})
    assert "No FHIR Patient in the prefetch" in card["detail"]


def test_cds_with_a_malformed_patient_answers_with_no_card(client, keys, png):
    cards = _hook(client, keys, {"media": _media(png), "documents": None,
                                 "patient": _patient(birthDate="02/03/1941", gender="male")})
    assert cards == []
