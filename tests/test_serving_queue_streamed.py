"""A queued slide upload is not read ahead: the admission queue watches for a disconnect only
on bodies the body-limit layer already holds, never on a streamed upload (up to
``--max-slide-mb``), which would otherwise sit in memory, whole, while it waits."""

from __future__ import annotations

import asyncio
import re

from meddx.serving.limits import BodyLimitMiddleware, LimitsMiddleware

CHUNKS, CHUNK = 64, 1 << 20  # a 64 MB upload, streamed in 1 MB messages


def _service():
    received: dict[str, int] = {"bytes": 0}

    async def app(scope, receive, send):
        if scope["path"] == "/slow":
            await asyncio.sleep(0.4)
        else:  # the upload route streams its body
            more = True
            while more:
                message = await receive()
                received["bytes"] += len(message.get("body", b""))
                more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limits = LimitsMiddleware(app, max_in_flight=1, workers=1, queue_timeout_s=5,
                              request_timeout_s=5, queue_size=2)
    outer = BodyLimitMiddleware(limits, max_bytes=1 << 20,
                                streamed={re.compile(r"^/upload$"): 1 << 30})
    return outer, limits, received


def test_queued_streamed_upload_is_not_read_until_admitted():
    outer, limits, received = _service()
    sent_chunks = 0
    codes: list[int] = []

    async def upload_receive():
        nonlocal sent_chunks
        if sent_chunks < CHUNKS:
            sent_chunks += 1
            return {"type": "http.request", "body": b"x" * CHUNK,
                    "more_body": sent_chunks < CHUNKS}
        await asyncio.sleep(3600)  # no disconnect: the client waits for its answer
        return {"type": "http.disconnect"}

    async def empty_receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def record(message):
        if message["type"] == "http.response.start":
            codes.append(message["status"])

    async def scenario():
        slow = asyncio.ensure_future(outer({"type": "http", "method": "GET", "path": "/slow",
                                            "headers": []}, empty_receive, record))
        await asyncio.sleep(0.05)
        upload = asyncio.ensure_future(outer({"type": "http", "method": "POST",
                                              "path": "/upload", "headers": []},
                                             upload_receive, record))
        await asyncio.sleep(0.2)
        queued, read_while_queued = limits.queued, sent_chunks
        await asyncio.gather(slow, upload)
        return queued, read_while_queued

    queued, read_while_queued = asyncio.run(scenario())
    assert queued == 1
    assert read_while_queued == 0  # nothing of the upload was taken while it waited
    assert codes == [200, 200] and received["bytes"] == CHUNKS * CHUNK  # then all of it
    assert limits.in_flight == 0 and limits.queued == 0
