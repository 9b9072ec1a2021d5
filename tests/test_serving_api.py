"""REST predict: uploads, JSON and FHIR inputs, FHIR output, bad inputs, audit log, real server."""

from __future__ import annotations

import base64
import hashlib
import io
import json

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from meddx.errors import ConfigError
from meddx.fhir.resources import check_invariants
from meddx.serving.app import create_app
from meddx.serving.auth import new_api_key
from meddx.serving.settings import ServeSettings
from serving_support import bomb_png, breast_png, get_package, live_server

NAME = "breast-tiny"
URL = f"/v1/models/{NAME}/predict"


@pytest.fixture(scope="module")
def package(request):
    return get_package(request)


@pytest.fixture(scope="module")
def key() -> tuple[str, str]:
    return new_api_key("tester")


@pytest.fixture(scope="module")
def settings(key, tmp_path_factory) -> ServeSettings:
    tmp = tmp_path_factory.mktemp("api")
    return ServeSettings(api_keys={"tester": key[1]}, research_use=True,
                         audit_log=tmp / "audit.jsonl", public_url="https://meddx.test")


@pytest.fixture(scope="module")
def client(package, settings):
    with TestClient(create_app([package.path], settings)) as c:
        yield c


@pytest.fixture(scope="module")
def auth(key) -> dict[str, str]:
    return {"Authorization": f"Bearer {key[0]}"}


@pytest.fixture(scope="module")
def png(breast_npz) -> bytes:
    return breast_png(breast_npz, 0)


def audit_lines(settings: ServeSettings) -> list[dict]:
    return [json.loads(x) for x in settings.audit_log.read_text().splitlines()]


def test_predict_png(client, auth, png):
    r = client.post(URL, headers=auth, files={"file": ("scan.png", png, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    p = body["predictions"][0]
    assert set(p["probabilities"]) == {"malignant", "normal, benign"}
    assert abs(sum(p["probabilities"].values()) - 1) < 1e-5
    assert p["model"]["name"] == NAME and len(p["model"]["sha256"]) == 64
    assert p["input_sha256"] == hashlib.sha256(png).hexdigest()
    assert body["notice"] == "research use only — not for diagnosis"
    assert "heatmap_png" not in p


def test_predict_with_heat_map(client, auth, png):
    r = client.post(URL + "?explain=true", headers=auth,
                    files={"file": ("scan.png", png, "image/png")})
    assert r.status_code == 200, r.text
    heat = base64.b64decode(r.json()["predictions"][0]["heatmap_png"])
    assert heat.startswith(b"\x89PNG")
    from PIL import Image

    assert Image.open(io.BytesIO(heat)).size[0] >= 224


def test_batch_upload(client, auth, breast_npz):
    files = [("files", (f"i{i}.png", breast_png(breast_npz, i), "image/png")) for i in range(3)]
    r = client.post(URL, headers=auth, files=files)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 3 and len({p["input_sha256"] for p in preds}) == 3


def test_json_base64_and_fhir_inputs(client, auth, png):
    data = base64.b64encode(png).decode()
    sha1 = base64.b64encode(hashlib.sha1(png).digest()).decode()
    inputs = [
        {"data": data, "contentType": "image/png"},
        {"resourceType": "Binary", "contentType": "image/png", "data": data},
        {"resourceType": "Media", "status": "completed",
         "content": {"contentType": "image/png", "data": data, "hash": sha1}},
        {"resourceType": "DocumentReference", "status": "current",
         "content": [{"attachment": {"contentType": "image/png", "data": data}}]},
    ]
    r = client.post(URL, headers=auth, json={"inputs": inputs})
    assert r.status_code == 200, r.text
    probs = [p["probabilities"]["malignant"] for p in r.json()["predictions"]]
    assert len(probs) == 4 and max(probs) - min(probs) < 1e-5
    single = client.post(URL, headers=auth, json=inputs[2])
    assert single.status_code == 200


def test_fhir_attachment_with_wrong_hash_is_422(client, auth, png):
    media = {"resourceType": "Media", "status": "completed",
             "content": {"contentType": "image/png", "data": base64.b64encode(png).decode(),
                         "hash": base64.b64encode(b"x" * 20).decode()}}
    r = client.post(URL, headers=auth, json=media)
    assert r.status_code == 422 and "hash" in r.json()["message"]


def test_format_fhir_bundle_validates(client, auth, png):
    from fhir.resources.R4B.bundle import Bundle

    r = client.post(URL + "?format=fhir&explain=true", headers=auth,
                    files={"file": ("scan.png", png, "image/png")})
    assert r.status_code == 200, r.text
    bundle = r.json()
    Bundle.model_validate(bundle)
    assert check_invariants(bundle) == []
    by_type = {}
    for e in bundle["entry"]:
        by_type.setdefault(e["resource"]["resourceType"], []).append(e)
    report = by_type["DiagnosticReport"][0]["resource"]
    media_ref = report["media"][0]["link"]["reference"]
    media = next(e["resource"] for e in bundle["entry"] if e["fullUrl"] == media_ref)
    assert base64.b64decode(media["content"]["data"]).startswith(b"\x89PNG")
    assert len(by_type["Observation"]) == 2
    assert "research use only" in report["conclusion"].lower()


def test_fhir_predict_endpoint(client, auth, png):
    media = {"resourceType": "Media", "status": "completed",
             "content": {"contentType": "image/png", "data": base64.b64encode(png).decode()}}
    r = client.post(f"/fhir/{NAME}/$predict", headers=auth, json=media)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+json")
    from fhir.resources.R4B.bundle import Bundle

    Bundle.model_validate(r.json())
    meta = client.get("/fhir/metadata")
    assert meta.status_code == 200 and meta.json()["resourceType"] == "CapabilityStatement"


# ---------------------------------------------------------------- bad input
def test_truncated_dicom_is_422(client, auth):
    from meddx.catalog import data_roots

    src = next((r / "dicom/CT_small.dcm" for r in data_roots()
                if (r / "dicom/CT_small.dcm").is_file()), None)
    if src is None:
        pytest.skip("bundled DICOM sample not found")
    raw = src.read_bytes()
    r = client.post(URL, headers=auth,
                    files={"file": ("ct.dcm", raw[: len(raw) // 2], "application/dicom")})
    assert r.status_code == 422, r.text
    assert r.json()["message"]


def test_png_declaring_50000_squared_pixels_is_413(client, auth):
    r = client.post(URL, headers=auth, files={"file": ("bomb.png", bomb_png(), "image/png")})
    assert r.status_code == 413
    assert "pixels" in r.json()["message"]


def test_wrong_content_type_is_415(client, auth):
    r = client.post(URL, headers=auth, files={"file": ("notes.pdf", b"%PDF-1.4", "application/pdf")})
    assert r.status_code == 415 and r.json()["hint"]
    raw = client.post(URL, headers={**auth, "Content-Type": "text/plain"}, content=b"hello")
    assert raw.status_code == 415


def test_mislabelled_bytes_are_422(client, auth, png):
    r = client.post(URL, headers=auth, files={"file": ("x.jpg", png, "image/jpeg")})
    assert r.status_code == 422 and "png" in r.json()["message"]


def test_unknown_model_is_404_with_suggestion(client, auth, png):
    r = client.post("/v1/models/breast-tiyn/predict", headers=auth,
                    files={"file": ("x.png", png, "image/png")})
    assert r.status_code == 404
    assert "did you mean 'breast-tiny'" in r.json()["message"]


def test_volume_to_a_2d_model_is_422(client, auth):
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(0).random((8, 8, 28, 28)).astype(np.float32))
    r = client.post(URL, headers=auth,
                    files={"file": ("vol.npy", buf.getvalue(), "application/octet-stream")})
    assert r.status_code == 422, r.text


def test_not_json_is_422(client, auth):
    r = client.post(URL, headers={**auth, "Content-Type": "application/json"}, content=b"{oops")
    assert r.status_code == 422


def test_too_many_inputs(client, auth, png):
    data = base64.b64encode(png).decode()
    r = client.post(URL, headers=auth,
                    json={"inputs": [{"data": data, "contentType": "image/png"}] * 40})
    assert r.status_code == 422 and "limit" in r.json()["message"]


# ------------------------------------------------------------------- audit
def test_audit_log_names_caller_and_input_never_the_file(client, auth, png, settings):
    before = len(audit_lines(settings))
    r = client.post(URL, headers=auth, files={"file": ("Doe_John_1970.png", png, "image/png")})
    assert r.status_code == 200
    lines = audit_lines(settings)
    assert len(lines) == before + 1  # flushed before the response returned
    last = lines[-1]
    assert last["caller"] == {"kind": "api-key", "key_id": "tester"}
    assert last["inputs"] == [hashlib.sha256(png).hexdigest()]
    assert last["model"]["name"] == NAME and len(last["model"]["sha256"]) == 64
    assert "Doe_John" not in settings.audit_log.read_text()
    assert "Doe_John" not in r.text


def test_rejected_input_is_audited(client, auth, settings):
    before = len(audit_lines(settings))
    client.post(URL, headers=auth, files={"file": ("b.png", bomb_png(), "image/png")})
    last = audit_lines(settings)[-1]
    assert len(audit_lines(settings)) == before + 1
    assert last["event"] == "error" and last["status"] == 413


# ----------------------------------------------------------- configuration
def test_research_only_model_refused_without_flag(package, key, tmp_path):
    s = ServeSettings(api_keys={"t": key[1]}, audit_log=tmp_path / "a.jsonl")
    with pytest.raises(ConfigError, match="research only"):
        create_app([package.path], s)


def test_service_without_any_credentials_refused(package, tmp_path):
    with pytest.raises(ConfigError, match="no caller"):
        create_app([package.path], ServeSettings(research_use=True))


def test_health_ready_after_warmup(client):
    import time

    for _ in range(200):
        r = client.get("/health/ready")
        if r.status_code == 200:
            break
        time.sleep(0.05)
    assert r.status_code == 200 and r.json()["models"] == {NAME: True}


def test_openapi_lists_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert "/v1/models/{name}/predict" in paths and "/cds-services/{service_id}" in paths


# --------------------------------------------------------------- real server
def test_real_server_on_loopback(package, settings, auth, png):
    app = create_app([package.path], settings)
    with live_server(app) as base:
        assert httpx.get(f"{base}/health/live").status_code == 200
        assert httpx.get(f"{base}/v1/models").status_code == 401
        r = httpx.post(f"{base}{URL}?explain=true", headers=auth,
                       files={"file": ("x.png", png, "image/png")}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["heatmap_png"]


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_blank_image_is_422(client, auth):
    r = client.post(URL, headers=auth,
                    files={"file": ("blank.png", _png(np.zeros((64, 64), np.uint8)), "image/png")})
    assert r.status_code == 422 and "blank" in r.json()["message"]


def test_image_far_smaller_than_the_model_grid_is_422(client, auth):
    tiny = np.random.default_rng(0).integers(0, 255, (4, 4), dtype=np.uint8)
    r = client.post(URL, headers=auth, files={"file": ("tiny.png", _png(tiny), "image/png")})
    assert r.status_code == 422 and "pixels" in r.json()["message"]


def test_intensity_outside_the_training_range_is_refused():
    from meddx.errors import InputMismatchError
    from meddx.modalities.image.grid import check_plausible

    spec = {"size": 28, "spatial_dims": 2, "intensity_range": [0.2, 0.6]}
    x = np.full((1, 28, 28), 0.95, np.float32)
    x[0, 0, 0] = 0.0
    with pytest.raises(InputMismatchError, match="outside the range"):
        check_plausible(x, spec, 784)
    check_plausible(x * 0.4, spec, 784)
