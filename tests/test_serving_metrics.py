"""GET /metrics scraped from a real uvicorn server and parsed with Prometheus's own parser;
request ids and input statistics in the audit log; access modes; one registry per app."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from meddx.serving.app import create_app
from meddx.serving.auth import new_api_key
from meddx.serving.settings import ServeSettings
from serving_support import breast_png, get_package, live_server

NAME = "breast-tiny"
ROUTE = "/v1/models/{name}/predict"
URL = f"/v1/models/{NAME}/predict"


@pytest.fixture(scope="module")
def package(request):
    return get_package(request)


@pytest.fixture(scope="module")
def key() -> tuple[str, str]:
    return new_api_key("scraper")


@pytest.fixture(scope="module")
def auth(key) -> dict[str, str]:
    return {"Authorization": f"Bearer {key[0]}"}


def _settings(key, tmp, **over) -> ServeSettings:
    return ServeSettings(**{"api_keys": {"scraper": key[1]}, "research_use": True,
                            "warmup": False, "audit_log": tmp / "audit.jsonl", **over})


def _samples(text: str) -> dict[str, list]:
    """Every sample of an exposition, by sample name, through prometheus_client's parser."""
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def _value(samples: dict[str, list], name: str, **labels: str) -> float:
    hits = [s.value for s in samples.get(name, [])
            if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, f"{name}{labels}: {len(hits)} samples"
    return hits[0]


@pytest.fixture(scope="module")
def scraped(package, key, auth, breast_npz, tmp_path_factory):
    """A real server answers 2 images, 1 broken upload and 1 unknown model; then is scraped."""
    tmp = tmp_path_factory.mktemp("metrics")
    settings = _settings(key, tmp)
    app = create_app([package.path], settings)
    answers = []
    with live_server(app) as base:
        for i in (0, 1):
            png = breast_png(breast_npz, i)
            r = httpx.post(f"{base}{URL}", headers=auth, timeout=30,
                           files={"file": ("scan.png", png, "image/png")})
            assert r.status_code == 200, r.text
            answers.append((r, png))
        bad = httpx.post(f"{base}{URL}", headers=auth, timeout=30,
                         files={"file": ("scan.png", b"not an image", "image/png")})
        unknown = httpx.post(f"{base}/v1/models/nope/predict", headers=auth, timeout=30,
                             files={"file": ("scan.png", answers[0][1], "image/png")})
        unauthorised = httpx.get(f"{base}/metrics")
        scrape = httpx.get(f"{base}/metrics", headers=auth)
    return {"answers": answers, "bad": bad, "unknown": unknown, "scrape": scrape,
            "unauthorised": unauthorised, "settings": settings}


def test_metrics_parse_and_count_requests(scraped, package):
    scrape = scraped["scrape"]
    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain")
    s = _samples(scrape.text)
    assert _value(s, "meddx_requests_total", model=NAME, route=ROUTE, status="200") == 2
    assert _value(s, "meddx_requests_total", model=NAME, route=ROUTE, status="422") == 1
    # an unknown model name in the URL must not become a label of its own
    assert _value(s, "meddx_requests_total", model="", route=ROUTE, status="404") == 1
    assert not any(x.labels.get("model") == "nope" for xs in s.values() for x in xs)
    assert _value(s, "meddx_errors_total", model=NAME, route=ROUTE, error="DataError") == 1
    assert _value(s, "meddx_errors_total", model="", route=ROUTE, error="NotFoundError") == 1
    assert _value(s, "meddx_errors_total", model="", route="/metrics", error="AuthError") == 1
    info = _value(s, "meddx_model_info", model=NAME, sha256=package.sha256)
    assert info == 1


def test_latency_histogram_is_consistent(scraped):
    s = _samples(scraped["scrape"].text)
    assert _value(s, "meddx_request_seconds_count", model=NAME, route=ROUTE) == 3
    assert _value(s, "meddx_request_seconds_sum", model=NAME, route=ROUTE) > 0
    buckets = sorted((float(x.labels["le"]), x.value) for x in s["meddx_request_seconds_bucket"]
                     if x.labels["model"] == NAME and x.labels["route"] == ROUTE)
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and buckets[-1] == (float("inf"), 3)


def test_decisions_by_class_match_the_answers(scraped):
    s = _samples(scraped["scrape"].text)
    decided = [r.json()["predictions"][0]["decision"] for r, _ in scraped["answers"]]
    for decision in set(decided):
        assert _value(s, "meddx_predictions_total", model=NAME,
                      decision=decision) == decided.count(decision)
    total = sum(x.value for x in s["meddx_predictions_total"])
    assert total == 2  # the failed upload answered nothing
    # no answer carries an OOD flag yet; the counter exists and agrees
    flagged = sum(1 for r, _ in scraped["answers"] if r.json()["predictions"][0].get("ood"))
    assert _value(s, "meddx_ood_total", model=NAME) == flagged


def test_metrics_need_authentication_by_default(scraped):
    assert scraped["unauthorised"].status_code == 401


def test_request_id_and_input_stats_in_audit_log(scraped, package):
    from meddx.training.reference import input_stats

    lines = [json.loads(x) for x in scraped["settings"].audit_log.read_text().splitlines()]
    by_id = {x.get("request_id"): x for x in lines}
    for r, png in scraped["answers"]:
        rid = r.headers["x-request-id"]
        assert len(rid) == 32 and rid in by_id
        line = by_id[rid]
        assert line["event"] == "predict"
        expected = input_stats(package_read(package, png))
        got = line["input_stats"][0]
        assert set(got) == {"mean", "std", "extreme"}
        for k in got:
            assert got[k] == pytest.approx(expected[k], rel=1e-6, abs=1e-9)
    bad_id = scraped["bad"].headers["x-request-id"]
    assert by_id[bad_id]["event"] == "error" and by_id[bad_id]["error"] == "DataError"
    ids = [r.headers["x-request-id"] for r, _ in scraped["answers"]] + [bad_id]
    assert len(set(ids)) == len(ids)


def package_read(package, png: bytes):
    from meddx.inference import Predictor

    return Predictor(package, backend="torch").read({"name": "x.png", "data": png}).tensor


def test_open_and_off_modes(package, key, tmp_path, breast_npz):
    png = breast_png(breast_npz, 0)
    with TestClient(create_app([package.path], _settings(key, tmp_path, metrics="open"))) as c:
        r = c.get("/metrics")
        assert r.status_code == 200 and "meddx_model_info" in r.text
    with TestClient(create_app([package.path], _settings(key, tmp_path, metrics="off"))) as c:
        assert c.get("/metrics", headers={"Authorization": f"Bearer {key[0]}"}).status_code \
            == 404
        r = c.post(URL, headers={"Authorization": f"Bearer {key[0]}"},
                   files={"file": ("x.png", png, "image/png")})
        assert r.status_code == 200 and len(r.headers["x-request-id"]) == 32


def test_each_app_counts_only_its_own_requests(package, key, tmp_path, breast_npz):
    png = breast_png(breast_npz, 0)
    head = {"Authorization": f"Bearer {key[0]}"}
    a = create_app([package.path], _settings(key, tmp_path / "a"))
    b = create_app([package.path], _settings(key, tmp_path / "b"))
    with TestClient(a) as ca, TestClient(b) as cb:
        for _ in range(3):
            assert ca.post(URL, headers=head,
                           files={"file": ("x.png", png, "image/png")}).status_code == 200
        sa, sb = _samples(ca.get("/metrics", headers=head).text), \
            _samples(cb.get("/metrics", headers=head).text)
    assert _value(sa, "meddx_requests_total", model=NAME, route=ROUTE, status="200") == 3
    assert "meddx_requests_total" not in sb or not [
        x for x in sb["meddx_requests_total"] if x.labels["route"] == ROUTE]
    assert np.isclose(_value(sb, "meddx_ood_total", model=NAME), 0)
