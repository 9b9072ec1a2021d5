"""``/v1/models/{name}/jobs`` on a real uvicorn server: 202 → progress → result (heat map,
FHIR DiagnosticReport valid in R4B), cancel, 429 past the queue, 413, a corrupt slide (422,
server alive), a slide without mpp (422 naming slide_mpp), server-side paths confined to
``--slide-root``."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("meddx.modalities.pathology.slide", reason="slide reading (path-io) absent")

from meddx.serving.auth import new_api_key  # noqa: E402
from meddx.serving.settings import ServeSettings  # noqa: E402
from pathology_model_support import (  # noqa: E402
    slide_pixels,
    untrained_slide_package,
    write_slide,
)
from serving_support import live_server  # noqa: E402


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A real (untrained) ABMIL package over the stats encoder: the job API's mechanics do
    not depend on what the weights learned."""
    return untrained_slide_package(tmp_path_factory.mktemp("pkg"))


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slides")
    write_slide(root / "small.tiff", slide_pixels((384, 384), True, 1))
    write_slide(root / "big.tiff", slide_pixels((2048, 2048), False, 2))
    write_slide(root / "nompp.tiff", slide_pixels((256, 256), False, 3), mpp=None)
    (root / "corrupt.svs").write_bytes(b"II*\x00" + os.urandom(4000))
    outside = root.parent / "outside.tiff"
    write_slide(outside, slide_pixels((256, 256), False, 4))
    (root / "link.tiff").symlink_to(outside)
    return root


@pytest.fixture(scope="module")
def server(package, slides, tmp_path_factory):
    from meddx.serving.app import create_app

    key = new_api_key("tester")
    tmp = tmp_path_factory.mktemp("svc")
    settings = ServeSettings(api_keys={"tester": key[1]}, research_use=True, warmup=False,
                             audit_log=tmp / "audit.jsonl", jobs_workers=1, jobs_queue=1,
                             slide_roots=(slides,), job_dir=tmp / "jobs",
                             max_slide_bytes=20_000_000, request_timeout_s=60)
    with live_server(create_app([package.path], settings)) as url:
        yield url, {"Authorization": f"Bearer {key[0]}"}, tmp


def _post(server, body: bytes | dict, **params) -> httpx.Response:
    url, auth, _ = server
    kw = {"json": body} if isinstance(body, dict) else {
        "content": body, "headers": {**auth, "Content-Type": "application/octet-stream"}}
    kw.setdefault("headers", auth)
    return httpx.post(f"{url}/v1/models/slides/jobs", params=params, timeout=60, **kw)


def _wait(server, location: str, final: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
          timeout: float = 120) -> dict:
    url, auth, _ = server
    deadline = time.time() + timeout
    while True:
        job = httpx.get(url + location, headers=auth, timeout=30).json()
        if job["status"] in final:
            return job
        assert time.time() < deadline, job
        time.sleep(0.1)


def test_upload_202_progress_result_heat_map_and_fhir(server, slides) -> None:
    from fhir.resources.R4B.bundle import Bundle

    url, auth, tmp = server
    r = _post(server, (slides / "small.tiff").read_bytes())
    assert r.status_code == 202, r.text
    location = r.headers["Location"]
    assert r.json()["status"] in ("queued", "running")
    job = _wait(server, location)
    assert job["status"] == "succeeded" and job["progress"] == 1.0, job
    res = job["result"]
    assert 0 <= res["probability"] <= 1 and res["n_tiles"] == job["tiles_total"] > 0
    png = httpx.get(url + res["heatmap_png"], headers=auth, timeout=30)
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    Bundle.model_validate(res["fhir"])
    kinds = [e["resource"]["resourceType"] for e in res["fhir"]["entry"]]
    assert "DiagnosticReport" in kinds and "Media" in kinds
    assert "small.tiff" not in str(job)  # the file name is never echoed
    assert not list((tmp / "jobs").rglob("slide*"))  # the upload is gone with its job
    assert httpx.delete(url + location, headers=auth).json()["status"] == "deleted"


def test_cancel_and_429_past_the_queue(server, slides) -> None:
    url, auth, _ = server
    big = _post(server, {"path": "big.tiff"})
    assert big.status_code == 202, big.text
    _wait(server, big.headers["Location"], final=("running",))
    queued = _post(server, {"path": "small.tiff"})
    assert queued.status_code == 202
    over = _post(server, {"path": "small.tiff"})
    assert over.status_code == 429 and over.headers["Retry-After"]
    r = httpx.delete(url + queued.headers["Location"], headers=auth)
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    r = httpx.delete(url + big.headers["Location"], headers=auth)
    assert r.status_code == 202
    job = _wait(server, big.headers["Location"])
    assert job["status"] == "cancelled" and job["tiles_done"] < job["tiles_total"]


def test_bad_slides_are_clear_422s_and_the_server_lives(server, slides) -> None:
    url, auth, _ = server
    r = _post(server, (slides / "corrupt.svs").read_bytes(), filename="x.svs")
    assert r.status_code == 422 and "cannot be read" in r.json()["message"]
    r = _post(server, {"path": "nompp.tiff"})
    assert r.status_code == 422 and "slide_mpp" in r.json()["hint"]
    r = _post(server, {"path": "nompp.tiff"}, slide_mpp=0.5)
    assert r.status_code == 202
    assert _wait(server, r.headers["Location"])["status"] == "succeeded"
    assert httpx.get(f"{url}/health/live", timeout=10).status_code == 200


def test_size_cap_and_paths_outside_the_slide_root(server, slides) -> None:
    r = _post(server, np.zeros(21_000_000, np.uint8).tobytes())
    assert r.status_code == 413
    for bad in ("../outside.tiff", str(slides.parent / "outside.tiff"), "link.tiff",
                "/etc/passwd"):
        r = _post(server, {"path": bad})
        assert r.status_code == 403, (bad, r.text)
    assert _post(server, {"path": "missing.tiff"}).status_code == 404
