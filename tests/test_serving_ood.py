"""An input outside what the model was trained on, end to end through a real server: the REST
answer carries the flag and no decision; the CDS card is an info card with no suggestion that
says why; the result page and the web page say the same."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest

from meddx.inference import Predictor
from meddx.serving.app import create_app
from meddx.serving.auth import new_api_key
from meddx.serving.cards import OOD_SUMMARY
from meddx.serving.cds import validate_response
from serving_support import PUBLIC, Keys, breast_png, cds_settings, get_package, live_server, token

SID = "breast-tiny"


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def package(request):
    return get_package(request)


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (28, 28)).astype(np.uint8)


@pytest.fixture(scope="module")
def server(package, tmp_path_factory):
    keys, key = Keys(), new_api_key("tester")
    settings = cds_settings(keys, tmp_path_factory.mktemp("ood"), api_keys={"tester": key[1]})
    with live_server(create_app([package.path], settings)) as base:
        yield base, keys, {"Authorization": f"Bearer {key[0]}"}


def _hook(png: bytes) -> dict:
    media = {"resourceType": "Media", "id": "m1", "status": "completed",
             "createdDateTime": "2024-05-01",
             "content": {"contentType": "image/png", "data": base64.b64encode(png).decode()}}
    return {"hook": "patient-view", "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
            "context": {"userId": "Practitioner/1", "patientId": "p-123"},
            "prefetch": {"media": {"resourceType": "Bundle", "type": "searchset",
                                   "entry": [{"resource": media}]}, "documents": None}}


def _cds(server, png: bytes) -> dict:
    base, keys, _ = server
    tok = token(keys.ec, f"{PUBLIC}/cds-services/{SID}")
    r = httpx.post(f"{base}/cds-services/{SID}", json=_hook(png), timeout=60,
                   headers={"Authorization": f"Bearer {tok}"})
    assert r.status_code == 200, r.text
    validate_response(r.json())
    return r.json()


def test_the_input_is_out_of_distribution(package, noise):
    assert Predictor(package, backend="torch").predict(noise)[0].ood is True  # precondition


def test_rest_answer_carries_the_flag(server, noise):
    base, _, auth = server
    r = httpx.post(f"{base}/v1/models/{SID}/predict", headers=auth, timeout=60,
                   files={"file": ("noise.png", _png(noise), "image/png")})
    assert r.status_code == 200, r.text
    p = r.json()["predictions"][0]
    assert p["ood"] is True and p["ood_score"] > 0 and p["decision"] is None


def test_cds_card_for_ood_input_has_no_suggestion(server, noise, package):
    card = _cds(server, _png(noise))["cards"][0]
    assert card["indicator"] == "info" and OOD_SUMMARY in card["summary"]
    assert "suggestions" not in card and "selectionBehavior" not in card
    detail = card["detail"]
    assert "outside what this model was trained on" in detail
    assert "no recommendation" in detail and "Decision" not in detail
    assert f"{package.card.ood.threshold:.4g}" in detail  # says why: score above threshold
    assert "%" not in detail.split("Why:")[0]  # no probabilities shown
    page = httpx.get(card["links"][0]["url"].replace(PUBLIC, server[0]), timeout=30)
    assert page.status_code == 200 and 'id="ood"' in page.text
    assert "outside what this model was trained on" in page.text.lower()


def test_in_distribution_card_is_unchanged(server, package, breast_npz):
    predictor = Predictor(package, backend="torch")
    index = next(i for i in range(40)
                 if predictor.predict(np.load(breast_npz)["test_images"][i])[0].ood is False)
    card = _cds(server, breast_png(breast_npz, index))["cards"][0]
    assert OOD_SUMMARY not in card["summary"] and "%" in card["detail"]


def test_web_page_has_the_ood_notice(server):
    base = server[0]
    page = httpx.get(f"{base}/", timeout=30).text
    js = httpx.get(f"{base}/static/app.js", timeout=30).text
    assert 'id="ood"' in page
    assert "p.ood" in js and "outside what this model was trained on" in js.lower()
