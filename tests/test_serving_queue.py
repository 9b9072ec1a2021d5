"""The bounded admission queue (issue 16, point 4): a burst beyond ``max_in_flight`` waits in a
short FIFO queue instead of being refused; a full queue or a wait past the timeout is 429 with
``Retry-After``; a client that disconnects while queued gives its place back."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest

from meddx.serving.limits import BodyLimitMiddleware, LimitsMiddleware
from serving_support import live_server


def slow_app(delay: float, seen: list[str] | None = None):
    """An ASGI app that takes ``delay`` seconds; ``seen`` records each request's query string
    when it starts computing."""

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        if seen is not None:
            seen.append(scope.get("query_string", b"").decode())
        await asyncio.sleep(delay)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def limits(app, **over) -> LimitsMiddleware:
    kw = {"max_in_flight": 2, "workers": 2, "worker_timeout_s": 5, "request_timeout_s": 5,
          "queue_size": 4, "queue_timeout_s": 5, "retry_after_s": 2}
    return LimitsMiddleware(app, **{**kw, **over})


async def _fire(app, n: int, stagger: float = 0.0) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c:
        async def one(i: int) -> httpx.Response:
            await asyncio.sleep(i * stagger)
            return await c.get(f"/work?{i}")

        return await asyncio.gather(*[one(i) for i in range(n)])


def test_burst_of_twice_the_limit_is_all_served_when_the_queue_fits_it():
    mw = limits(slow_app(0.2), max_in_flight=4, workers=4, queue_size=4)
    rs = asyncio.run(_fire(mw, 8))
    assert [r.status_code for r in rs] == [200] * 8
    assert mw.stats["queued"] == 4 and mw.in_flight == 0 and mw.queued == 0


def test_same_burst_without_a_queue_is_half_refused():
    """The baseline the queue changes: ``queue_size=0`` refuses what is over the limit."""
    mw = limits(slow_app(0.2), max_in_flight=4, workers=4, queue_size=0)
    codes = sorted(r.status_code for r in asyncio.run(_fire(mw, 8)))
    assert codes == [200] * 4 + [429] * 4


def test_beyond_the_queue_is_429_with_retry_after():
    mw = limits(slow_app(0.2), max_in_flight=2, queue_size=2)
    rs = asyncio.run(_fire(mw, 6))
    codes = sorted(r.status_code for r in rs)
    assert codes == [200] * 4 + [429] * 2
    refused = [r for r in rs if r.status_code == 429]
    assert all(r.headers["retry-after"] == "2" for r in refused)
    assert all("queue is full" in r.json()["message"] for r in refused)
    assert mw.stats["refused_full"] == 2 and mw.in_flight == 0


def test_waiting_past_the_queue_timeout_is_429_with_retry_after():
    mw = limits(slow_app(0.6), max_in_flight=1, workers=1, queue_size=5, queue_timeout_s=0.1)
    rs = asyncio.run(_fire(mw, 3))
    codes = sorted(r.status_code for r in rs)
    assert codes == [200, 429, 429]
    assert all(r.headers["retry-after"] == "2" and "0.1 s" in r.json()["message"]
               for r in rs if r.status_code == 429)
    assert mw.stats["refused_timeout"] == 2 and mw.queued == 0 and mw.in_flight == 0


def test_queue_is_first_in_first_out():
    seen: list[str] = []
    mw = limits(slow_app(0.05, seen), max_in_flight=1, workers=1, queue_size=10)
    rs = asyncio.run(_fire(mw, 6, stagger=0.01))
    assert all(r.status_code == 200 for r in rs)
    assert seen == [str(i) for i in range(6)]


def _raw_post(port: int, body: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"POST /work HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return s


def _wait_for(cond, timeout: float = 3.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_client_that_disconnects_while_queued_frees_its_place():
    """Real uvicorn: A runs (1.5 s), B is queued and hangs up; B's place is free at once (long
    before A ends), B never reaches the app, and C takes the one queue place and is served."""
    seen: list[str] = []
    mw = limits(slow_app(1.5, seen), max_in_flight=1, workers=1, queue_size=1,
                queue_timeout_s=10)
    app = BodyLimitMiddleware(mw, max_bytes=1024)
    with live_server(app) as base:
        port = int(base.rsplit(":", 1)[1])
        a = _raw_post(port, b"a")
        assert _wait_for(lambda: mw.in_flight == 1)
        b = _raw_post(port, b"b")
        assert _wait_for(lambda: mw.queued == 1)
        t0 = time.perf_counter()
        b.close()
        assert _wait_for(lambda: mw.queued == 0, timeout=1.0)
        assert time.perf_counter() - t0 < 1.0 and mw.stats["left_queue"] == 1
        c = _raw_post(port, b"c")  # the queue has one place: C gets it only if B left
        assert _wait_for(lambda: mw.queued == 1)
        replies = [x.recv(4096) for x in (a, c)]
        for x in (a, c):
            x.close()
    assert all(r.startswith(b"HTTP/1.1 200") for r in replies)
    assert len(seen) == 2 and mw.stats["refused_full"] == 0


@pytest.mark.parametrize("health", ["/health/live"])
def test_health_probe_is_not_queued(health):
    mw = limits(slow_app(0.3), max_in_flight=1, workers=1, queue_size=0)

    async def scenario():
        transport = httpx.ASGITransport(app=mw)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            busy = asyncio.ensure_future(c.get("/work"))
            await asyncio.sleep(0.05)
            r = await c.get(health)
            await busy
            return r

    assert asyncio.run(scenario()).status_code == 200


def test_serve_flags_set_the_queue(tmp_path, monkeypatch, tiny_sequence_package):
    """``meddx serve --queue-size/--queue-timeout-s`` reach the settings, and uvicorn's own
    connection cap leaves room for the queue (else uvicorn would answer 503 first)."""
    import uvicorn
    from typer.testing import CliRunner

    from meddx.cli import app

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    r = CliRunner().invoke(app, [
        "serve", str(tiny_sequence_package.path), "--insecure-no-auth", "--research-use",
        "--max-in-flight", "6", "--queue-size", "9", "--queue-timeout-s", "0.5",
        "--audit-log", str(tmp_path / "audit.jsonl")])
    assert r.exit_code == 0, r.output
    st = seen["app"].state.meddx.settings
    assert (st.max_in_flight, st.queue_size, st.queue_timeout_s) == (6, 9, 0.5)
    assert seen["limit_concurrency"] >= st.max_in_flight + st.queue_size
    wired = next(m for m in seen["app"].user_middleware if m.cls is LimitsMiddleware)
    assert (wired.kwargs["queue_size"], wired.kwargs["queue_timeout_s"]) == (9, 0.5)
