"""Two ``meddx serve`` replicas (real processes) sharing one real Redis (``--state``): a CDS
JWT accepted by replica A is refused when replayed to replica B; a slide job submitted to A is
listed, polled, fetched, and deleted on B; the rate limit counts both replicas; Redis down is a
503 with a hint (and the replica recovers); each replica keeps its own audit chain. Without
``--state`` nothing is shared (the single-process service as before)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import synthetic_ecg_observation
from meddx.serving.auth import new_api_key
from pathology_model_support import untrained_slide_package
from redis_support import free_port, redis_server
from serving_support import ISS, PUBLIC, Keys, token

pytestmark = pytest.mark.slow
RATE = 40  # requests per minute per caller, over both replicas


def _slide_package(folder: Path):
    return untrained_slide_package(folder)


class Replica:
    """One ``meddx serve`` process on a free loopback port."""

    def __init__(self, name: str, args: list[str], log: Path) -> None:
        self.name, self.port, self.log = name, free_port(), log
        cmd = [sys.executable, "-m", "meddx.cli", "serve", *args, "--port", str(self.port),
               "--replica-name", name]
        self.proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1",
                                          "MEDDX_LINK_SECRET": "replicas-share-this"})
        self.url = f"http://127.0.0.1:{self.port}"

    def wait(self, timeout: float = 180.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica {self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health/live", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"replica {self.name} did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_ecg_package):
    """Redis + replicas A and B (same models, keys, public URL and --state)."""
    tmp = tmp_path_factory.mktemp("replicas")
    slides = _slide_package(tmp / "pkg")
    keys = Keys()
    trust = tmp / "trust.json"
    trust.write_text(json.dumps({"issuers": [{"iss": ISS, "jwks": keys.jwks()}]}))
    tester, burst, rate = new_api_key("tester"), new_api_key("burst"), new_api_key("rate")
    key_file = tmp / "api-keys.json"
    key_file.write_text(json.dumps({"keys": [{"id": "tester", "sha256": tester[1]},
                                             {"id": "burst", "sha256": burst[1]},
                                             {"id": "rate", "sha256": rate[1]}]}))
    with redis_server() as redis:
        common = [str(tiny_ecg_package.path), str(slides.path), "--research-use",
                  "--public-url", PUBLIC, "--cds-jwks", str(trust), "--api-key-file",
                  str(key_file), "--state", redis.url, "--rate-limit", str(RATE),
                  "--audit-log", str(tmp / "audit.jsonl"), "--jobs-workers", "1",
                  "--max-slide-mb", "20", "--timeout", "60"]
        replicas = [Replica(n, common, tmp / f"{n}.log") for n in ("ward-a", "ward-b")]
        try:
            for r in replicas:
                r.wait()
            yield {"a": replicas[0], "b": replicas[1], "redis": redis, "keys": keys,
                   "tmp": tmp, "auth": {"Authorization": f"Bearer {tester[0]}"},
                   "burst": {"Authorization": f"Bearer {burst[0]}"},
                   "rate": {"Authorization": f"Bearer {rate[0]}"}}  # the rate test's alone
        finally:
            for r in replicas:
                r.stop()


def _hook_body() -> dict:
    obs = synthetic_ecg_observation(subject="Patient/p-1")
    return {"hook": "patient-view", "hookInstance": "0b0e5a52-8f0d-4a53-a4f7-0d3b8e5c1a11",
            "context": {"userId": "Practitioner/1", "patientId": "p-1"},
            "prefetch": {"ecg": {"resourceType": "Bundle", "type": "searchset",
                                 "entry": [{"resource": obs}]}}}


def test_a_jwt_replayed_to_another_replica_is_refused(cluster):
    sid = "af-untrained"
    tok = token(cluster["keys"].ec, f"{PUBLIC}/cds-services/{sid}")
    headers = {"Authorization": f"Bearer {tok}"}
    first = httpx.post(f"{cluster['a'].url}/cds-services/{sid}", json=_hook_body(),
                       headers=headers, timeout=60)
    assert first.status_code == 200, first.text
    links = [link["url"] for card in first.json()["cards"] for link in card.get("links", [])
             if "/ui/result/" in link["url"]]
    assert links, first.json()
    for url in links:  # a card's heat-map link made by A opens on B
        path = url.removeprefix(PUBLIC)
        assert httpx.get(f"{cluster['b'].url}{path}", timeout=30).status_code == 200
    replay = httpx.post(f"{cluster['b'].url}/cds-services/{sid}", json=_hook_body(),
                        headers=headers, timeout=60)
    assert replay.status_code == 401
    assert replay.json()["error"] == "unauthorized"
    fresh = token(cluster["keys"].ec, f"{PUBLIC}/cds-services/{sid}")  # B still serves
    ok = httpx.post(f"{cluster['b'].url}/cds-services/{sid}", json=_hook_body(),
                    headers={"Authorization": f"Bearer {fresh}"}, timeout=60)
    assert ok.status_code == 200, ok.text


def test_a_job_submitted_to_a_is_answered_by_b(cluster, tmp_path):
    from pathology_model_support import slide_pixels, write_slide

    a, b, auth = cluster["a"], cluster["b"], cluster["auth"]
    slide = write_slide(tmp_path / "s.tiff", slide_pixels((384, 384), True, 1))
    r = httpx.post(f"{a.url}/v1/models/slides/jobs", content=slide.read_bytes(),
                   headers={**auth, "Content-Type": "application/octet-stream"}, timeout=60)
    assert r.status_code == 202, r.text
    job_id, location = r.json()["id"], r.headers["location"]
    assert r.json()["replica"] == "ward-a"
    listed = httpx.get(f"{b.url}/v1/models/slides/jobs", headers=auth, timeout=10)
    assert listed.status_code == 200, listed.text
    assert job_id in [j["id"] for j in listed.json()["jobs"]]
    deadline, body = time.time() + 120, {}
    while time.time() < deadline:
        body = httpx.get(f"{b.url}{location}", headers=auth, timeout=10).json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(1)
    assert body["status"] == "succeeded", body
    assert body["result"]["fhir"]["resourceType"] == "Bundle"
    png = httpx.get(f"{b.url}{body['result']['heatmap_png']}", headers=auth, timeout=10)
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    local = httpx.get(f"{a.url}{body['result']['heatmap_png']}", headers=auth, timeout=10)
    assert local.content == png.content
    other = httpx.get(f"{b.url}{location}", headers=cluster["burst"], timeout=10)
    assert other.status_code == 404  # another caller's job stays invisible on every replica
    gone = httpx.delete(f"{b.url}{location}", headers=auth, timeout=10)
    assert gone.status_code == 200 and gone.json()["status"] == "deleted"
    assert httpx.get(f"{a.url}{location}", headers=auth, timeout=10).status_code == 404


def test_the_rate_limit_counts_over_both_replicas(cluster):
    if time.time() % 60 > 25:  # one clock-minute window holds the whole burst
        time.sleep(61 - time.time() % 60)
    codes, answers = [], []
    for i in range(RATE + 1):
        replica = cluster["a" if i % 2 == 0 else "b"]
        r = httpx.get(f"{replica.url}/v1/models", headers=cluster["rate"], timeout=10)
        codes.append(r.status_code)
        answers.append(r)
    assert codes[:RATE] == [200] * RATE  # each replica alone saw only half of them
    assert codes[RATE] == 429
    last = answers[RATE]
    assert last.json()["error"] == "RateLimitedError" and "--rate-limit" in last.json()["hint"]
    assert 1 <= int(last.headers["retry-after"]) <= 60
    assert httpx.get(f"{cluster['a'].url}/v1/models", headers=cluster["auth"],
                     timeout=10).status_code == 200  # another caller is not limited


def test_each_replica_writes_its_own_audit_chain(cluster):
    from meddx.serving.audit import verify_log

    tmp = cluster["tmp"]
    for name in ("ward-a", "ward-b"):
        log = tmp / f"audit.{name}.jsonl"
        assert log.is_file(), sorted(p.name for p in tmp.iterdir())
        assert verify_log(log).ok
    assert not (tmp / "audit.jsonl").exists()


def test_redis_down_is_a_503_with_a_hint_and_the_replica_recovers(cluster):
    a, b, redis = cluster["a"], cluster["b"], cluster["redis"]
    redis.stop()
    try:
        r = httpx.get(f"{b.url}/v1/models", headers=cluster["auth"], timeout=30)
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "StateUnavailableError"
        assert "Redis" in r.json()["hint"] and r.headers["retry-after"]
        tok = token(cluster["keys"].ec, f"{PUBLIC}/cds-services/af-untrained")
        cds = httpx.post(f"{a.url}/cds-services/af-untrained", json=_hook_body(),
                         headers={"Authorization": f"Bearer {tok}"}, timeout=30)
        assert cds.status_code == 503 and cds.json()["error"] == "StateUnavailableError"
        ready = httpx.get(f"{a.url}/health/ready", timeout=30)
        assert ready.status_code == 503 and ready.json()["state"] == "unreachable"
        assert httpx.get(f"{a.url}/health/live", timeout=10).status_code == 200
        assert a.proc.poll() is None and b.proc.poll() is None
    finally:
        redis.start()
    deadline = time.time() + 30
    while time.time() < deadline:
        r = httpx.get(f"{b.url}/v1/models", headers=cluster["auth"], timeout=10)
        if r.status_code == 200:
            break
        time.sleep(0.5)
    assert r.status_code == 200, r.text
