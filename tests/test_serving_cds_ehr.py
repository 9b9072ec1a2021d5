"""CDS Hooks ``patient-view`` for ICU mortality, end to end: a tiny GRU-D package, a real
PhysioNet 2012 stay converted to FHIR, a signed call → risk card (schema-checked) and an R4B
RiskAssessment; fetch from an allow-listed FHIR server (paged), 412, fail-safe."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import urllib.parse

import pytest
from fastapi.testclient import TestClient

from conftest import require_data
from meddx.fhir.resources import validate
from meddx.modalities.ehr.fhir import physionet_to_bundle, risk_band
from meddx.serving.app import create_app
from meddx.serving.cds import _allowed, validate_response
from meddx.serving.settings import ServeSettings
from serving_support import PUBLIC, FhirHandler, Keys, cds_settings, loopback_fhir, token

SID = "icu-tiny"
STAY = "ehr/physionet2012/set-a/132539.txt"
PAGE = 100  # Observations per page of the loopback FHIR server


@pytest.fixture(scope="session")
def icu_package(tmp_path_factory):
    """A GRU-D ensemble (2 members, as the recipe ships 5) trained for one epoch on 150 stays
    per split (≈5-10 s)."""
    require_data("ehr/physionet2012/Outcomes-a.txt")
    from meddx.training import train

    return train(
        {"name": SID, "seed": 0,
         "data": {"dataset": "physionet2012", "limit": 150, "options": {"progress": False}},
         "model": {"name": "grud", "options": {"hidden": 16, "pooling": "mean_max",
                                               "wide": True, "members": 2}},
         "train": {"epochs": 1, "batch_size": 64, "early_stopping_patience": None,
                   "threads": 1}},
        out=tmp_path_factory.mktemp("icu_run"), progress=False)


@pytest.fixture(scope="module")
def bundle() -> dict:
    return physionet_to_bundle(require_data(STAY))


def _split(bundle: dict) -> tuple[dict, dict, list[dict]]:
    res = [e["resource"] for e in bundle["entry"]]
    patient = next(r for r in res if r["resourceType"] == "Patient")
    encounter = next(r for r in res if r["resourceType"] == "Encounter")
    return patient, encounter, [r for r in res if r["resourceType"] == "Observation"]


def searchset(resources: list[dict]) -> dict:
    return {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
            "entry": [{"resource": r} for r in resources]}


def prefetch_of(bundle: dict) -> dict:
    """What an EHR sends for the service's three templates (searchsets, no fullUrls)."""
    patient, encounter, obs = _split(copy.deepcopy(bundle))
    return {"patient": patient, "encounter": searchset([encounter]),
            "observations": searchset(obs)}


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def fhir_server(bundle):
    """A loopback FHIR server: Patient read, Encounter and (paged) Observation searches."""
    patient, encounter, obs = _split(bundle)
    hits: list[tuple[str, str | None]] = []

    class Handler(FhirHandler):
        def do_GET(self) -> None:  # noqa: N802
            hits.append((self.path, self.headers.get("Authorization")))
            url = urllib.parse.urlsplit(self.path)
            q = dict(urllib.parse.parse_qsl(url.query))
            base = f"http://127.0.0.1:{self.server.server_address[1]}/fhir"
            if url.path == f"/fhir/Patient/{patient['id']}":
                body = patient
            elif url.path == "/fhir/Encounter":
                body = searchset([encounter])
            elif url.path == "/fhir/Observation":
                page = int(q.get("_page", 1))
                body = searchset(obs[(page - 1) * PAGE:page * PAGE])
                if page * PAGE < len(obs):
                    nxt = urllib.parse.urlencode({**q, "_page": page + 1})
                    body["link"] = [{"relation": "next", "url": f"{base}/Observation?{nxt}"}]
            else:
                body = {"resourceType": "OperationOutcome"}
            ok = self.headers.get("Authorization") == "Bearer fhir-token"
            self.reply(body, ok)

    with loopback_fhir(Handler) as base:
        yield base, hits


@pytest.fixture(scope="module")
def settings(keys, fhir_server, tmp_path_factory) -> ServeSettings:
    tmp = tmp_path_factory.mktemp("cds_ehr")
    return cds_settings(keys, tmp, fhir_server_allow=(fhir_server[0],))


@pytest.fixture(scope="module")
def client(icu_package, settings):
    with TestClient(create_app([icu_package.path], settings)) as c:
        yield c


@pytest.fixture(scope="module")
def expected(icu_package, bundle):
    """The risk the Python API gives for the same stay (the PhysioNet → FHIR Bundle)."""
    from meddx.inference import load_model

    [p] = load_model(icu_package.path).predict([bundle])
    return p


def call(client, keys, body: dict, sid: str = SID):
    tok = token(keys.ec, f"{PUBLIC}/cds-services/{sid}")
    return client.post(f"/cds-services/{sid}", json=body,
                       headers={"Authorization": f"Bearer {tok}"})


def hook_body(patient_id: str, prefetch: dict | None, **extra) -> dict:
    body = {"hook": "patient-view", "hookInstance": "6e3e9bb4-4d7e-4c1e-9d0b-0f7e0b7a1c2d",
            "context": {"userId": "Practitioner/1", "patientId": patient_id}, **extra}
    if prefetch is not None:
        body["prefetch"] = prefetch
    return body


def the_card(response) -> dict:
    assert response.status_code == 200, response.text
    validate_response(response.json())
    cards = response.json()["cards"]
    assert len(cards) == 1
    return cards[0]


def risk_assessment_of(card: dict) -> dict:
    [sugg] = card["suggestions"]
    [action] = sugg["actions"]
    assert action["type"] == "create"
    return action["resource"]


@pytest.mark.slow
def test_discovery_asks_for_patient_encounter_observations(client, keys):
    tok = token(keys.ec, f"{PUBLIC}/cds-services")
    r = client.get("/cds-services", headers={"Authorization": f"Bearer {tok}"})
    [svc] = [s for s in r.json()["services"] if s["id"] == SID]
    assert svc["hook"] == "patient-view"
    assert svc["prefetch"] == {
        "patient": "Patient/{{context.patientId}}",
        "encounter": "Encounter?patient={{context.patientId}}&status=in-progress",
        "observations": "Observation?patient={{context.patientId}}&_count=5000"}


@pytest.mark.slow
def test_risk_card_from_prefetch(client, keys, bundle, icu_package, expected, settings):
    patient, _, obs = _split(bundle)
    raw = json.dumps(hook_body(patient["id"], prefetch_of(bundle))).encode()
    tok = token(keys.ec, f"{PUBLIC}/cds-services/{SID}")
    card = the_card(client.post(f"/cds-services/{SID}", content=raw, headers={
        "Authorization": f"Bearer {tok}", "Content-Type": "application/json"}))
    audit = settings.audit_log.read_text()
    last = json.loads(audit.splitlines()[-1])
    assert last["event"] == "predict" and last["inputs"] == [hashlib.sha256(raw).hexdigest()]
    assert patient["id"] not in audit  # no patient identifiers in the audit log
    pkg = icu_package.card
    risk = expected.calibrated["died"]
    band = risk_band(risk, pkg)[0]
    s = card["summary"]
    assert len(s) < 140
    assert f"in-hospital death risk {risk:.0%} ({band})" in s  # calibrated risk and band
    assert f"{SID} v{pkg.version}" in s and f"v{pkg.version}" in card["source"]["label"]
    drivers = [re.sub(r"\s*\([^)]*\)", "", f).strip() for f in expected.notes.get("findings", [])
               if "lowers the risk" not in f] if expected.notes.get("findings") else []
    findings_line = next(x for x in card["detail"].splitlines()
                         if x.startswith("Top contributing findings: "))
    assert len(findings_line) > 40  # the explainer's findings in words
    raising = [f for f in findings_line[27:].rstrip(".").split("; ") if "lowers the risk" not in f]
    if raising or drivers:  # the top risk-raising finding is in the summary
        first = re.sub(r"\s*\([^)]*\)", "", (raising or drivers)[0]).strip()
        assert first in s
    assert "Hours of data used: 48" in card["detail"]
    assert f"Risk band **{band}**" in card["detail"]
    # the alert is stated as risk against the threshold, never as "Decision died"
    assert "Decision" not in card["detail"]
    side = "at or above" if expected.decision == "died" else "below"
    assert (f"Calibrated risk {risk:.1%} (class *died*) is **{side}** the alert threshold "
            f"{expected.threshold:.1%}") in card["detail"]
    assert card["indicator"] in ("info", "warning", "critical")
    # the RiskAssessment offered with the card: R4B-valid, same risk, basis = Observations used
    ra = risk_assessment_of(card)
    validate(ra)
    pred = ra["prediction"][0]
    assert abs(pred["probabilityDecimal"] - risk) < 1e-4
    assert pred["qualitativeRisk"]["coding"][0]["code"] == band
    assert ra["subject"] == {"reference": f"Patient/{patient['id']}"}
    used = {b["reference"] for b in ra["basis"]}
    statics = {o["id"] for o in obs if o["code"]["text"] in ("Age", "Height")}
    assert used == {f"Observation/{o['id']}" for o in obs if o["id"] not in statics}
    assert len(used) == len(expected.notes["basis"])


@pytest.mark.slow
def test_basis_leaves_out_observations_outside_the_window(client, keys, bundle):
    patient, _, obs = _split(bundle)
    pre = prefetch_of(bundle)
    late = copy.deepcopy(obs[-1])
    late.update(id="late-obs", effectiveDateTime="2012-01-03T12:00:00+00:00")  # 60 h
    pre["observations"]["entry"].append({"resource": late})
    card = the_card(call(client, keys, hook_body(patient["id"], pre)))
    used = {b["reference"] for b in risk_assessment_of(card)["basis"]}
    assert "Observation/late-obs" not in used and len(used) > 100
    assert "Items left out (unknown code, unit, outside the window …): 1." in card["detail"]


@pytest.mark.slow
def test_missing_prefetch_without_fhir_server_is_412(client, keys, bundle):
    patient, _, _ = _split(bundle)
    assert call(client, keys, hook_body(patient["id"], None)).status_code == 412
    partial = {k: v for k, v in prefetch_of(bundle).items() if k != "observations"}
    assert call(client, keys, hook_body(patient["id"], partial)).status_code == 412


@pytest.mark.slow
def test_fetched_from_allow_listed_fhir_server_with_paging(client, keys, bundle, fhir_server,
                                                           expected):
    server, hits = fhir_server
    hits.clear()
    patient, _, obs = _split(bundle)
    body = hook_body(patient["id"], None, fhirServer=server,
                     fhirAuthorization={"access_token": "fhir-token", "token_type": "Bearer",
                                        "expires_in": 300, "scope": "patient/*.read",
                                        "subject": "meddx"})
    card = the_card(call(client, keys, body))
    ra = risk_assessment_of(card)
    assert abs(ra["prediction"][0]["probabilityDecimal"] - expected.calibrated["died"]) < 1e-4
    assert len(ra["basis"]) == len(expected.notes["basis"])  # every page was read
    paths = [p for p, _ in hits]
    assert f"/fhir/Patient/{patient['id']}" in paths
    assert any(p.startswith("/fhir/Encounter?") and "status=in-progress" in p for p in paths)
    pages = [p for p in paths if p.startswith("/fhir/Observation?")]
    assert len(pages) == -(-len(obs) // PAGE) >= 2
    assert {a for _, a in hits} == {"Bearer fhir-token"}


@pytest.mark.slow
def test_prefetched_bundle_with_more_pages_is_completed_or_412(client, keys, bundle,
                                                               fhir_server, expected):
    server, _ = fhir_server
    patient, _, _ = _split(bundle)
    pre = prefetch_of(bundle)
    first = pre["observations"]["entry"][:PAGE]
    pre["observations"]["entry"] = first
    query = urllib.parse.urlencode({"patient": patient["id"], "_count": 5000, "_page": 2})
    pre["observations"]["link"] = [{"relation": "next", "url": f"{server}/Observation?{query}"}]
    # no FHIR server to complete it: never a risk from part of the stay
    assert call(client, keys, hook_body(patient["id"], pre)).status_code == 412
    auth = {"access_token": "fhir-token"}
    card = the_card(call(client, keys, hook_body(patient["id"], pre, fhirServer=server,
                                                 fhirAuthorization=auth)))
    assert len(risk_assessment_of(card)["basis"]) == len(expected.notes["basis"])


@pytest.mark.slow
@pytest.mark.parametrize("breakage", ["no-admission-time", "no-observations"])
def test_failure_inside_the_service_gives_no_card(client, keys, bundle, settings, breakage):
    patient, _, _ = _split(bundle)
    pre = prefetch_of(bundle)
    if breakage == "no-admission-time":
        del pre["encounter"]["entry"][0]["resource"]["period"]
    else:  # a stay without any observation: "cannot assess", never a risk of 0
        pre["observations"] = searchset([])
    r = call(client, keys, hook_body(patient["id"], pre))
    assert r.status_code == 200 and r.json() == {"cards": []}
    last = json.loads(settings.audit_log.read_text().splitlines()[-1])
    assert last["event"] == "error" and "no card" in last["error"]
    assert patient["id"] not in settings.audit_log.read_text()


@pytest.mark.slow
def test_body_that_is_not_json_is_422(client, keys):
    tok = token(keys.ec, f"{PUBLIC}/cds-services/{SID}")
    r = client.post(f"/cds-services/{SID}", content=b'{"hook": "patient-view", ',
                    headers={"Authorization": f"Bearer {tok}",
                             "Content-Type": "application/json"})
    assert r.status_code == 422 and "not a CDS Hooks request" in r.json()["message"]


def test_fhir_server_allow_list_matches_whole_path_segments():
    allow = ("https://ehr.example.org/fhir",)
    assert _allowed("https://ehr.example.org/fhir", allow)
    assert _allowed("https://ehr.example.org/fhir/", allow)
    assert _allowed("https://ehr.example.org/fhir/Observation?patient=1", allow)
    assert not _allowed("https://ehr.example.org/fhir-evil", allow)
    assert not _allowed("https://ehr.example.org.evil.test/fhir", allow)
    assert not _allowed("https://ehr.example.org", allow)
