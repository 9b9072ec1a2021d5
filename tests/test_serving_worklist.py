"""The imaging worklist over HTTP (issue 21, point 4): ``GET /v1/worklist`` answers the DICOM
node's worklist, most urgent first, as JSON or as a FHIR R4B Bundle of Tasks; it needs a
caller, and names studies by their salted key unless asked for UIDs."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from meddx.dicom.worklist import WorklistEntry, save_worklist
from meddx.serving.app import create_app
from meddx.serving.auth import new_api_key
from meddx.serving.settings import ServeSettings

NOW = dt.datetime(2026, 12, 7, 4, 0, tzinfo=dt.UTC)
ENTRIES = [
    WorklistEntry("aaaa000000000001", 0.31, "routine", ("breast: not malignant",), ("breast 1",),
                  NOW, study_uid="1.2.826.0.1.1"),
    WorklistEntry("aaaa000000000002", 0.95, "stat", ("breast: malignant (risk 0.95)",),
                  ("breast 1",), NOW, study_uid="1.2.826.0.1.2"),
    WorklistEntry("aaaa000000000003", 0.40, "urgent", ("breast: out of distribution",),
                  ("breast 1",), NOW, study_uid="1.2.826.0.1.3"),
]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dicom-work")
    save_worklist(folder / "state.sqlite", ENTRIES)
    return folder


@pytest.fixture(scope="module")
def api_key():
    return new_api_key("pacs-dashboard")


def _client(package, api_key, tmp, **over):
    settings = ServeSettings(research_use=True, warmup=False, audit_log=tmp / "audit.jsonl",
                             api_keys={"pacs-dashboard": api_key[1]}, **over)
    return TestClient(create_app([package.path], settings))


@pytest.fixture(scope="module")
def client(tiny_sequence_package, api_key, work, tmp_path_factory):
    with _client(tiny_sequence_package, api_key, tmp_path_factory.mktemp("wl"),
                 dicom_work=work) as c:
        yield c


def test_worklist_json_most_urgent_first_without_uids(client, api_key):
    r = client.get("/v1/worklist", headers={"Authorization": f"Bearer {api_key[0]}"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == 3
    assert [s["priority"] for s in body["studies"]] == ["stat", "urgent", "routine"]
    assert "1.2.826.0.1" not in r.text  # salted keys only
    assert r.headers["cache-control"] == "no-store"
    r = client.get("/v1/worklist?study_uid=true",
                   headers={"Authorization": f"Bearer {api_key[0]}"})
    assert r.json()["studies"][0]["study_uid"] == "1.2.826.0.1.2"


def test_worklist_as_fhir_bundle_of_tasks(client, api_key):
    from fhir.resources.R4B.bundle import Bundle

    r = client.get("/v1/worklist?format=fhir", headers={"Authorization": f"Bearer {api_key[0]}"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    bundle = Bundle.model_validate(r.json())
    tasks = [e.resource for e in bundle.entry]
    assert [t.priority for t in tasks] == ["stat", "urgent", "routine"]
    assert tasks[0].focus.identifier.value == "aaaa000000000002"


def test_worklist_needs_a_caller(client):
    r = client.get("/v1/worklist")
    assert r.status_code == 401
    assert r.json()["error"] == "unauthorized"


def test_without_a_dicom_work_folder_the_worklist_is_404_with_a_hint(
        tiny_sequence_package, api_key, tmp_path):
    with _client(tiny_sequence_package, api_key, tmp_path) as c:
        r = c.get("/v1/worklist", headers={"Authorization": f"Bearer {api_key[0]}"})
    assert r.status_code == 404
    assert "--dicom-work" in r.json()["hint"]


def test_cli_queue_as_fhir(work, tmp_path):
    from meddx.cli import app

    (work / "state.sqlite").touch()
    result = CliRunner().invoke(app, ["dicom", "queue", "--work", str(work), "--fhir"])
    assert result.exit_code == 0, result.output
    bundle = json.loads(result.output)
    assert bundle["resourceType"] == "Bundle"
    assert [e["resource"]["priority"] for e in bundle["entry"]] == ["stat", "urgent", "routine"]
