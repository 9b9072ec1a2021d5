"""Body cap before spooling, bounded concurrency (429/503 + Retry-After), per-request timeout."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from meddx.serving.limits import BodyLimitMiddleware, LimitsMiddleware
from serving_support import live_server

CAP = 64 * 1024


def upload_app(cap: int = CAP) -> FastAPI:
    app = FastAPI()

    @app.post("/upload")
    async def upload(request: Request) -> dict:
        form = await request.form()
        sizes = [len(await f.read()) for _, f in form.multi_items() if hasattr(f, "read")]
        return {"sizes": sizes}

    app.add_middleware(BodyLimitMiddleware, max_bytes=cap)
    return app


@pytest.fixture
def spool_spy(monkeypatch):
    """Record every temporary file Starlette's multipart parser creates."""
    import starlette.formparsers as fp

    created: list[int] = []
    real = fp.SpooledTemporaryFile

    def spy(*args, **kwargs):
        created.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fp, "SpooledTemporaryFile", spy)
    return created


def test_body_over_cap_rejected_before_spooling(spool_spy):
    with TestClient(upload_app()) as c:
        r = c.post("/upload", files={"f": ("big.bin", b"x" * (CAP * 3), "image/png")})
    assert r.status_code == 413
    assert "limit" in r.json()["message"] and r.json()["hint"]
    assert spool_spy == []  # the parser never saw the body


def test_body_within_cap_reaches_the_parser(spool_spy):
    with TestClient(upload_app()) as c:
        r = c.post("/upload", files={"f": ("ok.bin", b"x" * 1000, "image/png")})
    assert r.status_code == 200 and r.json()["sizes"] == [1000]
    assert spool_spy  # proves the spy would have seen an over-cap body


def test_declared_length_over_cap_answered_without_reading_the_body():
    """Real server: the client declares 50 MB, sends 1 KB and waits; 413 comes at once."""
    with live_server(upload_app()) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: multipart/form-data; boundary=xyz\r\n"
                      b"Content-Length: 52428800\r\n\r\n" + b"x" * 1024)
            start = time.perf_counter()
            reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 413")
        assert time.perf_counter() - start < 5


def test_chunked_body_over_cap_rejected_on_real_server():
    def chunks():
        for _ in range(20):
            yield b"y" * 8192  # 160 KB, no Content-Length

    with live_server(upload_app()) as base:
        r = httpx.post(f"{base}/upload", content=chunks(),
                       headers={"Content-Type": "multipart/form-data; boundary=b"}, timeout=10)
    assert r.status_code == 413


def test_invalid_content_length_is_400():
    with live_server(upload_app()) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
            reply = s.recv(4096)
        assert reply.split(b" ")[1] in (b"400", b"413")


# ------------------------------------------------------------ concurrency
def slow_app(delay: float):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await asyncio.sleep(delay)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


async def _fire(app, n: int, path: str = "/work") -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        return await asyncio.gather(*[c.get(path) for _ in range(n)])


def test_admission_beyond_limit_is_429_with_retry_after():
    """Without a queue (``queue_size=0``, the behaviour before issue 16) a request beyond the
    limit is refused at once; tests/test_serving_queue.py covers the queue."""
    mw = LimitsMiddleware(slow_app(0.3), max_in_flight=2, workers=2, worker_timeout_s=5,
                          request_timeout_s=5, queue_size=0, retry_after_s=3)
    rs = asyncio.run(_fire(mw, 5))
    codes = sorted(r.status_code for r in rs)
    assert codes == [200, 200, 429, 429, 429]
    assert all(r.headers["retry-after"] == "3" for r in rs if r.status_code == 429)
    assert mw.in_flight == 0


def test_waiting_too_long_for_a_worker_is_503():
    mw = LimitsMiddleware(slow_app(0.5), max_in_flight=10, workers=1, worker_timeout_s=0.1,
                          request_timeout_s=5)
    rs = asyncio.run(_fire(mw, 3))
    codes = sorted(r.status_code for r in rs)
    assert codes == [200, 503, 503]
    assert all("retry-after" in r.headers for r in rs if r.status_code == 503)


def test_request_timeout_is_503_and_keeps_its_slot_until_done():
    mw = LimitsMiddleware(slow_app(0.6), max_in_flight=4, workers=1, worker_timeout_s=5,
                          request_timeout_s=0.1)

    async def scenario():
        transport = httpx.ASGITransport(app=mw)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.get("/work")
            held = mw.in_flight  # the abandoned work still runs
            await asyncio.sleep(0.8)
            return r, held, mw.in_flight

    r, held, after = asyncio.run(scenario())
    assert r.status_code == 503 and "retry-after" in r.headers
    assert held == 1 and after == 0


def test_health_is_not_limited():
    mw = LimitsMiddleware(slow_app(0.2), max_in_flight=1, workers=1, worker_timeout_s=0.05,
                          request_timeout_s=5)
    rs = asyncio.run(_fire(mw, 4, "/health/live"))
    assert all(r.status_code == 200 for r in rs)


def test_warmup_freezes_the_loaded_objects_and_raises_the_young_threshold():
    """A 1 MB prefetch allocates ~100,000 short-lived objects: after warm-up the service
    freezes what it loaded and collects the young generation every 10,000 allocations, not
    every 700 (engine.tune_gc)."""
    import gc

    from meddx.serving.engine import GC_THRESHOLDS, ModelHub
    from meddx.serving.settings import ServeSettings

    before = gc.get_threshold()
    try:
        ModelHub([], ServeSettings(research_use=True, warmup=False)).warmup()
        assert gc.get_threshold() == GC_THRESHOLDS == (10_000, 10, 10)
        assert gc.get_freeze_count() > 0
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()
