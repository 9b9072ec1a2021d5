"""CDS Hooks 2.0: discovery, cards (schema-checked), prefetch / fetch / 412, fail-safe,
feedback, signed heat-map links."""

from __future__ import annotations

import base64
import copy
import json
import time

import jsonschema
import pytest
from fastapi.testclient import TestClient

from meddx.inference.prediction import Prediction
from meddx.serving.app import create_app
from meddx.serving.cards import indicator, summary_line
from meddx.serving.cds import validate_response
from meddx.serving.settings import ServeSettings
from serving_support import (
    PUBLIC,
    FhirHandler,
    Keys,
    breast_png,
    cds_settings,
    get_package,
    loopback_fhir,
    token,
)

SID = "breast-tiny"


@pytest.fixture(scope="module")
def package(request):
    return get_package(request)


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def png(breast_npz) -> bytes:
    return breast_png(breast_npz, 3)


def media_bundle(png: bytes) -> dict:
    data = base64.b64encode(png).decode()
    return {"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": {"resourceType": "Media", "id": "m-old", "status": "completed",
                      "createdDateTime": "2020-01-01", "content": {"contentType": "image/png",
                                                                  "data": data}}},
        {"resource": {"resourceType": "Media", "id": "m-new", "status": "completed",
                      "createdDateTime": "2024-05-01", "content": {"contentType": "image/png",
                                                                  "data": data}}},
    ]}


@pytest.fixture(scope="module")
def fhir_server(png):
    """A loopback FHIR server answering Media and DocumentReference searches."""
    hits: list[str] = []

    class Handler(FhirHandler):
        def do_GET(self) -> None:  # noqa: N802
            hits.append(self.path)
            ok = self.headers.get("Authorization") == "Bearer fhir-token"
            body = media_bundle(png) if self.path.startswith("/fhir/Media") else \
                {"resourceType": "Bundle", "type": "searchset", "entry": []}
            self.reply(body, ok)

    with loopback_fhir(Handler) as base:
        yield base, hits


@pytest.fixture(scope="module")
def settings(keys, fhir_server, tmp_path_factory) -> ServeSettings:
    tmp = tmp_path_factory.mktemp("cds")
    return cds_settings(keys, tmp, fhir_server_allow=(fhir_server[0],))


@pytest.fixture(scope="module")
def client(package, settings):
    with TestClient(create_app([package.path], settings)) as c:
        yield c


def call(client, keys, body: dict, sid: str = SID):
    tok = token(keys.ec, f"{PUBLIC}/cds-services/{sid}")
    return client.post(f"/cds-services/{sid}", json=body, headers={"Authorization": f"Bearer {tok}"})


def hook_body(prefetch: dict | None, hook: str = "patient-view", **extra) -> dict:
    body = {"hook": hook, "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
            "context": {"userId": "Practitioner/1", "patientId": "p-123"}, **extra}
    if prefetch is not None:
        body["prefetch"] = prefetch
    return body


def test_discovery(client, keys):
    tok = token(keys.ec, f"{PUBLIC}/cds-services")
    r = client.get("/cds-services", headers={"Authorization": f"Bearer {tok}"})
    assert r.status_code == 200
    services = {s["id"]: s for s in r.json()["services"]}
    assert services[SID]["hook"] == "patient-view"
    assert services[f"{SID}-order-select"]["hook"] == "order-select"
    assert "{{context.patientId}}" in services[SID]["prefetch"]["media"]
    assert "research use only" in services[SID]["title"]


def test_patient_view_card_validates(client, keys, png):
    r = call(client, keys, hook_body({"media": media_bundle(png), "documents": None}))
    assert r.status_code == 200, r.text
    body = r.json()
    validate_response(body)
    assert len(body["cards"]) == 1
    card = body["cards"][0]
    assert len(card["uuid"]) == 36 and len(card["summary"]) < 140
    assert card["indicator"] in ("info", "warning", "critical")
    assert "v1.0.0" in card["source"]["label"] and "research use only" in card["source"]["label"]
    assert "research use only" in card["detail"].lower() and "%" in card["detail"]
    assert "most recent Media (2024-05-01)" in card["detail"]
    assert card["links"][0]["type"] == "absolute"
    assert card["links"][0]["url"].startswith(f"{PUBLIC}/ui/result/")


def test_order_select_service(client, keys, png):
    body = hook_body({"media": media_bundle(png), "documents": None}, hook="order-select")
    body["context"].update({"selections": ["ServiceRequest/sr-1"],
                            "draftOrders": {"resourceType": "Bundle", "type": "collection",
                                            "entry": []}})
    r = call(client, keys, body, sid=f"{SID}-order-select")
    assert r.status_code == 200 and len(r.json()["cards"]) == 1
    validate_response(r.json())


def test_heat_map_link_is_signed_and_expiring(client, keys, png, settings):
    card = call(client, keys, hook_body({"media": media_bundle(png), "documents": None})
                ).json()["cards"][0]
    url = card["links"][0]["url"].replace(PUBLIC, "")
    page = client.get(url)  # no token: the signed link is the credential
    assert page.status_code == 200 and 'id="overlay"' in page.text
    assert "p-123" not in page.text  # no patient identifiers on the page
    path, query = url.split("?")
    img = client.get(f"{path}/overlay.png?{query}")
    assert img.status_code == 200 and img.content.startswith(b"\x89PNG")
    tampered = url[:-1] + ("0" if url[-1] != "0" else "1")
    assert client.get(tampered).status_code == 404
    exp = int(query.split("exp=")[1].split("&")[0])
    forged = url.replace(f"exp={exp}", f"exp={exp + 3600}")
    assert client.get(forged).status_code == 404
    store = client.app.state.meddx.heatmaps
    rid = path.rsplit("/", 1)[1]
    meta = store.root / rid / "meta.json"
    data = json.loads(meta.read_text())
    data["expires"] = int(time.time()) - 1
    meta.write_text(json.dumps(data))
    assert client.get(url).status_code == 404  # expired results are gone
    assert not (store.root / rid).exists()


def test_missing_prefetch_without_fhir_server_is_412(client, keys):
    r = call(client, keys, hook_body(None))
    assert r.status_code == 412


def test_missing_prefetch_fetched_from_allow_listed_fhir_server(client, keys, fhir_server):
    server, hits = fhir_server
    body = hook_body(None, fhirServer=server,
                     fhirAuthorization={"access_token": "fhir-token", "token_type": "Bearer",
                                        "expires_in": 300, "scope": "patient/*.read",
                                        "subject": "meddx"})
    r = call(client, keys, body)
    assert r.status_code == 200, r.text
    assert len(r.json()["cards"]) == 1
    assert any("patient=p-123" in h for h in hits)


def test_unreachable_fhir_server_is_412(package, keys, tmp_path):
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/fhir"
    settings = cds_settings(keys, tmp_path, fhir_server_allow=(dead,), fhir_timeout_s=1.0)
    with TestClient(create_app([package.path], settings)) as c:
        body = hook_body(None, fhirServer=dead, fhirAuthorization={"access_token": "t"})
        assert call(c, keys, body).status_code == 412


def test_fhir_server_not_allow_listed_is_412(client, keys):
    body = hook_body(None, fhirServer="https://elsewhere.test/fhir",
                     fhirAuthorization={"access_token": "t"})
    assert call(client, keys, body).status_code == 412


def test_no_image_in_prefetch_gives_no_card(client, keys):
    r = call(client, keys, hook_body({"media": None, "documents": None}))
    assert r.status_code == 200 and r.json() == {"cards": []}


def test_failure_inside_the_service_gives_no_card(client, keys, settings):
    broken = {"resourceType": "Media", "status": "completed",
              "content": {"contentType": "image/png",
                          "data": base64.b64encode(b"\x89PNG\r\n\x1a\n-corrupt-").decode()}}
    r = call(client, keys, hook_body({"media": broken, "documents": None}))
    assert r.status_code == 200 and r.json() == {"cards": []}
    last = json.loads(settings.audit_log.read_text().splitlines()[-1])
    assert last["event"] == "error" and "no card" in last["error"]
    assert "p-123" not in settings.audit_log.read_text()


def test_wrong_hook_for_service_is_422(client, keys, png):
    r = call(client, keys, hook_body({"media": None, "documents": None}, hook="order-sign"))
    assert r.status_code == 422


def test_unknown_service_is_404(client, keys):
    r = call(client, keys, hook_body({}), sid="nope")
    assert r.status_code == 404


def test_feedback_is_stored_without_free_text(client, keys, png, settings):
    card = call(client, keys, hook_body({"media": media_bundle(png), "documents": None})
                ).json()["cards"][0]
    fb = {"feedback": [{"card": card["uuid"], "outcome": "overridden",
                        "overrideReason": {"reason": card["overrideReasons"][0],
                                           "userComment": "patient Jane Doe says otherwise"},
                        "outcomeTimestamp": "2026-01-01T10:00:00Z"}]}
    tok = token(keys.ec, f"{PUBLIC}/cds-services/{SID}/feedback")
    r = client.post(f"/cds-services/{SID}/feedback", json=fb,
                    headers={"Authorization": f"Bearer {tok}"})
    assert r.status_code == 200
    stored = json.loads(settings.feedback_log.read_text().splitlines()[-1])
    assert stored["card"] == card["uuid"] and stored["known_card"] is True
    assert stored["outcome"] == "overridden" and stored["has_comment"] is True
    assert "Jane" not in settings.feedback_log.read_text()


# -------------------------------------------------------------- card logic
def _pred(decision: str | None, risk: float, refer: bool = False) -> Prediction:
    return Prediction(id="0", probabilities={"malignant": risk, "benign": 1 - risk},
                      calibrated={"malignant": risk, "benign": 1 - risk}, label="malignant",
                      decision=decision, refer=refer, threshold=0.3,
                      operating_point="sensitivity@0.95",
                      prediction_set=["malignant", "benign"] if refer else ["malignant"],
                      model={"name": "m", "version": "1", "sha256": "0",
                             "positive_class": "malignant"})


@pytest.mark.parametrize("decision, risk, refer, expected", [
    ("malignant", 0.9, False, "critical"),
    ("malignant", 0.5, False, "warning"),
    ("not malignant", 0.1, False, "info"),
    ("not malignant", 0.2, True, "warning"),  # uncertain is never shown as reassuring
    (None, 0.7, False, "warning"),
])
def test_indicator(decision, risk, refer, expected):
    assert indicator(_pred(decision, risk, refer), critical_risk=0.8) == expected


def test_summary_is_short():
    class Card:
        name = "x" * 200

    assert len(summary_line(_pred("malignant", 0.9, True), Card())) < 140


# ------------------------------------------------------------ the schema
GOOD = {"cards": [{"uuid": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea", "summary": "ok",
                   "indicator": "info", "source": {"label": "meddx"}}]}


def _bad(mutate) -> dict:
    body = copy.deepcopy(GOOD)
    mutate(body["cards"][0])
    return body


@pytest.mark.parametrize("mutate", [
    lambda c: c.update(summary="x" * 140),
    lambda c: c.update(indicator="urgent"),
    lambda c: c.pop("source"),
    lambda c: c.pop("summary"),
    lambda c: c.update(source={}),
    lambda c: c.update(suggestions=[{"label": "do it"}]),  # cds-resp-6: selectionBehavior
    lambda c: c.update(selectionBehavior="at-most-one",
                       suggestions=[{"label": "a", "isRecommended": True},
                                    {"label": "b", "isRecommended": True}]),  # cds-resp-1
    lambda c: c.update(links=[{"label": "x", "url": "https://x"}]),  # link type missing
    lambda c: c.update(uuid="not-a-uuid"),
    lambda c: c.update(overrideReasons=[{"code": "x", "system": "s"}]),  # display missing
    lambda c: c.update(unknown=1),
])
def test_schema_rejects(mutate):
    validate_response(GOOD)
    with pytest.raises(jsonschema.ValidationError):
        validate_response(_bad(mutate))


# ------------------------------------------------- ECG and EHR adapters (inputs only)
def test_ecg_adapter_takes_the_latest_waveform():
    import numpy as np

    from meddx.modalities.ecg.fhir import record_to_observation
    from meddx.modalities.ecg.io import from_array
    from meddx.serving.cds import HookRequest, adapter_for

    adapter = adapter_for("ecg")
    assert "{{context.patientId}}" in adapter.prefetch(None, "patient-view")["ecg"]
    rec = from_array(np.zeros((1, 300), dtype=np.float32), 300.0, ["I"], "r1")
    old = {**record_to_observation(rec), "id": "old", "effectiveDateTime": "2020-01-01T00:00:00Z"}
    new = {**record_to_observation(rec), "id": "new", "effectiveDateTime": "2024-01-01T00:00:00Z"}
    bundle = {"resourceType": "Bundle", "type": "searchset",
              "entry": [{"resource": old}, {"resource": new}]}
    req = HookRequest.model_validate(hook_body({"ecg": bundle}))
    got = adapter.inputs(req, {"ecg": bundle}, None)
    assert got.sources[0]["id"] == "new" and got.basis == ["Observation/new"]
    assert adapter.inputs(req, {"ecg": None}, None) is None


def test_ehr_adapter_needs_patient_and_encounter():
    from meddx.serving.cds import HookRequest, adapter_for

    adapter = adapter_for("ehr")
    templates = adapter.prefetch(None, "patient-view")
    assert set(templates) == {"patient", "encounter", "observations"}
    assert all("{{context.patientId}}" in t for t in templates.values())
    data = {"patient": {"resourceType": "Patient", "id": "p"},
            "encounter": {"resourceType": "Bundle", "type": "searchset", "entry": []},
            "observations": None}
    req = HookRequest.model_validate(hook_body(data))
    got = adapter.inputs(req, data, None)
    assert got.sources[0]["patient"]["id"] == "p" and len(got.digests[0]) == 64
    assert adapter.inputs(req, {**data, "patient": None}, None) is None
    assert adapter.risk_assessment
