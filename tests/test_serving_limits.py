"""Body cap before spooling, bounded concurrency (429/503 + Retry-After), per-request timeout."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from meddx.serving.limits import BODY_BUFFERED, BodyLimitMiddleware, LimitsMiddleware
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
    mw = LimitsMiddleware(slow_app(0.3), max_in_flight=2, workers=2, queue_timeout_s=5,
                          request_timeout_s=5, retry_after_s=3)
    rs = asyncio.run(_fire(mw, 5))
    codes = sorted(r.status_code for r in rs)
    assert codes == [200, 200, 429, 429, 429]
    assert all(r.headers["retry-after"] == "3" for r in rs if r.status_code == 429)
    assert mw.in_flight == 0


def test_waiting_too_long_for_a_worker_is_503():
    mw = LimitsMiddleware(slow_app(0.5), max_in_flight=10, workers=1, queue_timeout_s=0.1,
                          request_timeout_s=5)
    rs = asyncio.run(_fire(mw, 3))
    codes = sorted(r.status_code for r in rs)
    assert codes == [200, 503, 503]
    assert all("retry-after" in r.headers for r in rs if r.status_code == 503)


def test_request_timeout_is_503_and_keeps_its_slot_until_done():
    mw = LimitsMiddleware(slow_app(0.6), max_in_flight=4, workers=1, queue_timeout_s=5,
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
    mw = LimitsMiddleware(slow_app(0.2), max_in_flight=1, workers=1, queue_timeout_s=0.05,
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


# ------------------------------------------------------------ admission queue (overload)
def test_burst_of_twice_the_limit_is_all_served_when_the_queue_fits_it():
    """2 × max_in_flight slow requests: with a queue of max_in_flight, every one is served
    (queue 0 refuses half of them: test_admission_beyond_limit_is_429_with_retry_after)."""
    mw = LimitsMiddleware(slow_app(0.2), max_in_flight=3, workers=3, queue_timeout_s=5,
                          request_timeout_s=5, queue_size=3)
    rs = asyncio.run(_fire(mw, 6))
    assert [r.status_code for r in rs] == [200] * 6
    assert mw.in_flight == 0 and mw.queued == 0


def test_past_the_queue_is_429_with_retry_after():
    mw = LimitsMiddleware(slow_app(0.3), max_in_flight=2, workers=2, queue_timeout_s=5,
                          request_timeout_s=5, retry_after_s=4, queue_size=2)
    rs = asyncio.run(_fire(mw, 7))
    codes = sorted(r.status_code for r in rs)
    assert codes == [200] * 4 + [429] * 3
    assert all(r.headers["retry-after"] == "4" for r in rs if r.status_code == 429)
    assert mw.in_flight == 0 and mw.queued == 0


def test_waiting_in_the_queue_past_the_timeout_is_429():
    mw = LimitsMiddleware(slow_app(0.6), max_in_flight=1, workers=1, queue_timeout_s=0.15,
                          request_timeout_s=5, queue_size=4)

    async def scenario():
        start = time.perf_counter()
        rs = await _fire(mw, 3)
        return rs, time.perf_counter() - start

    rs, took = asyncio.run(scenario())
    codes = sorted(r.status_code for r in rs)
    assert codes == [200, 429, 429]
    assert all("retry-after" in r.headers for r in rs if r.status_code == 429)
    assert took < 1.5 and mw.in_flight == 0 and mw.queued == 0


def test_queue_is_fifo():
    order: list[int] = []

    async def app(scope, receive, send):
        order.append(int(scope["query_string"] or b"0"))
        await asyncio.sleep(0.05)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    mw = LimitsMiddleware(app, max_in_flight=1, workers=1, queue_timeout_s=5,
                          request_timeout_s=5, queue_size=5)

    async def scenario():
        transport = httpx.ASGITransport(app=mw)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            tasks = []
            for i in range(5):
                tasks.append(asyncio.ensure_future(c.get(f"/work?{i}")))
                await asyncio.sleep(0.005)  # arrive in order
            return await asyncio.gather(*tasks)

    rs = asyncio.run(scenario())
    assert all(r.status_code == 200 for r in rs) and order == [0, 1, 2, 3, 4]


def test_a_client_leaving_the_queue_frees_its_place():
    """The queued request's channel says http.disconnect: it leaves, nothing is sent, and a
    later request takes the place. (Its body counts as read by BodyLimitMiddleware, as every
    body but a streamed slide upload is: test_serving_queue_streamed.py.)"""
    mw = LimitsMiddleware(slow_app(0.4), max_in_flight=1, workers=1, queue_timeout_s=5,
                          request_timeout_s=5, queue_size=1)

    async def scenario():
        sent: list[dict] = []

        async def leaving_receive():
            await asyncio.sleep(0.05)
            return {"type": "http.disconnect"}

        async def record(message):
            sent.append(message)

        transport = httpx.ASGITransport(app=mw)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            first = asyncio.ensure_future(c.get("/work"))
            await asyncio.sleep(0.02)
            scope = {"type": "http", "method": "GET", "path": "/work", "headers": [],
                     BODY_BUFFERED: True}
            leaver = asyncio.ensure_future(mw(scope, leaving_receive, record))
            await asyncio.sleep(0.01)
            queued_before = mw.queued
            await leaver
            queued_after = mw.queued
            second = await c.get("/work")  # the queue has room again
            return (await first), second, sent, queued_before, queued_after

    first, second, sent, before, after = asyncio.run(scenario())
    assert before == 1 and after == 0 and sent == []
    assert first.status_code == 200 and second.status_code == 200
    assert mw.in_flight == 0


def test_queued_post_body_reaches_the_app():
    """While queued the body is read (to see a disconnect); the app still gets all of it."""
    app = upload_app(cap=CAP)
    mw = LimitsMiddleware(app, max_in_flight=1, workers=1, queue_timeout_s=5,
                          request_timeout_s=5, queue_size=3)

    async def scenario():
        transport = httpx.ASGITransport(app=BodyLimitMiddleware(mw, max_bytes=CAP))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await asyncio.gather(*[
                c.post("/upload", files={"f": ("a.bin", b"z" * (1000 + i), "image/png")})
                for i in range(4)])

    rs = asyncio.run(scenario())
    assert sorted(r.json()["sizes"][0] for r in rs) == [1000, 1001, 1002, 1003]


def test_real_server_burst_is_served_with_the_queue_and_refused_without():
    """uvicorn on loopback, 2 × max_in_flight concurrent slow requests."""

    async def burst(base: str) -> list[int]:
        async with httpx.AsyncClient(base_url=base, timeout=10) as c:
            return sorted(r.status_code for r in await asyncio.gather(
                *[c.get("/work") for _ in range(8)]))

    for queue, expected in ((4, [200] * 8), (0, [200] * 4 + [429] * 4)):
        mw = LimitsMiddleware(slow_app(0.3), max_in_flight=4, workers=4, queue_timeout_s=5,
                              request_timeout_s=5, queue_size=queue)
        with live_server(mw) as base:
            assert asyncio.run(burst(base)) == expected, queue


def test_settings_default_queue_is_twice_the_admission_limit():
    from meddx.serving.settings import ServeSettings

    assert ServeSettings(max_in_flight=5).admission_queue == 10
    assert ServeSettings(max_in_flight=5, queue_size=0).admission_queue == 0
