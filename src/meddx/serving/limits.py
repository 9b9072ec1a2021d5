"""ASGI limits that protect the service before any route code runs.

* :class:`BodyLimitMiddleware` — a request whose ``Content-Length`` exceeds the cap is answered
  ``413`` before one byte of its body is read; a body without a length (chunked) is read into
  memory only up to the cap. Routes (and Starlette's multipart parser, which spools uploads to
  temporary files) only ever see bodies within the cap.
* :class:`LimitsMiddleware` — at most ``max_in_flight`` requests are admitted (running or
  waiting for a worker). A request that finds them all taken waits in a FIFO queue of at most
  ``queue_size`` places for up to ``queue_timeout_s``; a full queue or a wait past the timeout
  is answered ``429`` with ``Retry-After`` (``queue_size=0``: refused at once, the behaviour
  before the queue). A client that disconnects while queued gives its place back. At most
  ``workers`` run at once; an admitted request that waits longer than ``worker_timeout_s`` for
  one gets ``503`` with ``Retry-After``; one that runs longer than ``request_timeout_s`` gets
  ``503`` and its work keeps its slot until it ends, so the bound on work in progress stays
  true.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter, deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["BodyLimitMiddleware", "LimitsMiddleware", "json_response"]

logger = logging.getLogger(__name__)

#: scope key set when the whole request body has been read (and is replayed from memory)
BODY_BUFFERED = "meddx.body_buffered"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def json_response(send: Send, status: int, error: str, message: str,
                        hint: str | None = None, headers: dict[str, str] | None = None) -> None:
    """Send a complete JSON error response ``{error, message, hint}`` on a raw ASGI channel."""
    body = json.dumps({"error": error, "message": message, "hint": hint}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v
    return None


class BodyLimitMiddleware:
    """Reject request bodies over ``max_bytes`` before anything is spooled.

    Args:
        app: the wrapped ASGI app.
        max_bytes: the cap on the request body, in bytes.
        streamed: paths (compiled patterns) whose POST bodies are not read here but streamed
            by their route, with their own cap (slide uploads); a declared length over that cap
            is still refused here.
    """

    def __init__(self, app: ASGIApp, max_bytes: int,
                 streamed: dict[Any, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.streamed = streamed or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = next((c for pattern, c in self.streamed.items()
                    if scope.get("method") == "POST" and pattern.match(scope.get("path", ""))),
                   None)
        declared = _header(scope, b"content-length")
        if cap is not None:
            if declared is not None and declared.isdigit() and int(declared) > cap:
                await self._too_large(send, int(declared), cap)
                return
            await self.app(scope, receive, send)
            return
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await json_response(send, 400, "BadRequest", "invalid Content-Length header")
                return
            if length > self.max_bytes:
                await self._too_large(send, length)
                return
        body, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._too_large(send, None)
                return
            body.append(chunk)
            more = message.get("more_body", False)
        scope[BODY_BUFFERED] = True  # LimitsMiddleware may then watch for a disconnect
        await self.app(scope, _replay(b"".join(body), receive), send)

    async def _too_large(self, send: Send, length: int | None, cap: int | None = None) -> None:
        logger.info("request body over the cap rejected (%s bytes declared)", length)
        await json_response(
            send, 413, "PayloadTooLargeError",
            f"request body is larger than the limit of {cap or self.max_bytes} bytes",
            hint="send a smaller file, or ask the operator to raise --max-body-mb",
            headers={"connection": "close"},
        )


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def inner() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return inner


class LimitsMiddleware:
    """Bounded admission with a short FIFO queue, bounded concurrency, a per-request timeout.

    Args:
        app: the wrapped ASGI app.
        max_in_flight: requests admitted at once (running + waiting for a worker).
        workers: requests running at once.
        worker_timeout_s: longest wait of an admitted request for a worker before 503.
        request_timeout_s: longest run before 503.
        queue_size: requests that may wait for admission; more get 429 at once.
        queue_timeout_s: longest wait for admission before 429.
        retry_after_s: value of the ``Retry-After`` header.
        exempt: path prefixes not limited (health probes, static files).

    Attributes:
        in_flight: requests admitted now.
        stats: counts of ``queued``, ``refused_full``, ``refused_timeout`` and
            ``left_queue`` (clients that disconnected while queued).
    """

    def __init__(self, app: ASGIApp, *, max_in_flight: int, workers: int,
                 worker_timeout_s: float, request_timeout_s: float, queue_size: int = 0,
                 queue_timeout_s: float = 2.0, retry_after_s: int = 1,
                 exempt: tuple[str, ...] = ("/health", "/static")) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.workers = workers
        self.worker_timeout_s = worker_timeout_s
        self.request_timeout_s = request_timeout_s
        self.queue_size = queue_size
        self.queue_timeout_s = queue_timeout_s
        self.retry_after = {"retry-after": str(retry_after_s)}
        self.exempt = exempt
        self.in_flight = 0
        self.stats: Counter[str] = Counter()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sem: asyncio.Semaphore | None = None

    @property
    def queued(self) -> int:
        """Requests waiting for admission now."""
        return sum(1 for f in self._waiters if not f.done())

    def _exempt(self, scope: Scope) -> bool:
        path = scope.get("path", "")
        return path == "/" or path.startswith(self.exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._exempt(scope):
            await self.app(scope, receive, send)
            return
        if self.in_flight < self.max_in_flight and not self._waiters:
            self.in_flight += 1
        else:
            admitted, receive = await self._queue(scope, receive, send)
            if not admitted:
                return
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.workers)
        try:
            await asyncio.wait_for(self._sem.acquire(), timeout=self.worker_timeout_s)
        except TimeoutError:
            self._free_slot()
            await json_response(send, 503, "OverloadedError",
                                "the service is busy; retry shortly", headers=self.retry_after)
            return
        await self._run(scope, receive, send)

    async def _queue(self, scope: Scope, receive: Receive,
                     send: Send) -> tuple[bool, Receive]:
        """Wait in the FIFO queue for an admission slot, handed over by :meth:`_free_slot`.

        Returns whether the request was admitted, and the ``receive`` the app must use (the
        body read while watching for a disconnect is replayed by it)."""
        if len(self._waiters) >= self.queue_size:
            self.stats["refused_full"] += 1
            await json_response(send, 429, "OverloadedError",
                                "too many requests in progress and the queue is full; "
                                "retry shortly", headers=self.retry_after)
            return False, receive
        self.stats["queued"] += 1
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        watch, receive = _disconnect_watch(scope, receive)
        try:
            await asyncio.wait({slot, watch} if watch else {slot}, timeout=self.queue_timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            if watch is not None:
                watch.cancel()
            if not slot.done():
                slot.cancel()
                self._waiters.remove(slot)
        if not slot.cancelled():  # admitted: the slot was handed over while we waited
            return True, receive
        if watch is not None and watch.done() and not watch.cancelled() and watch.result():
            self.stats["left_queue"] += 1
            return False, receive
        self.stats["refused_timeout"] += 1
        await json_response(send, 429, "OverloadedError",
                            f"no capacity within {self.queue_timeout_s:g} s; retry shortly",
                            headers=self.retry_after)
        return False, receive

    def _free_slot(self) -> None:
        """Give a finished request's admission slot to the first queued one, else free it."""
        while self._waiters:
            slot = self._waiters.popleft()
            if not slot.done():
                slot.set_result(None)
                return
        self.in_flight -= 1

    def _release(self, task: asyncio.Task) -> None:
        self._free_slot()
        if self._sem is not None:
            self._sem.release()

    @staticmethod
    def _log_late_failure(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("request failed after its 503 was sent", exc_info=task.exception())

    async def _run(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = {"started": False, "abandoned": False}

        async def guarded_send(message: Message) -> None:
            if state["abandoned"]:
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, guarded_send))
        task.add_done_callback(self._release)
        done, _ = await asyncio.wait({task}, timeout=self.request_timeout_s)
        if done:
            task.result()  # re-raise a failure for the server to log
            return
        if state["started"]:  # too late to answer differently; let it finish
            await task
            return
        state["abandoned"] = True
        task.add_done_callback(self._log_late_failure)
        logger.warning("request to %s exceeded %.1f s; answered 503",
                       scope.get("path"), self.request_timeout_s)
        await json_response(send, 503, "OverloadedError",
                            f"the request took longer than {self.request_timeout_s:g} s",
                            hint="retry later or send fewer inputs per request",
                            headers=self.retry_after)


def _disconnect_watch(scope: Scope, receive: Receive) -> tuple[asyncio.Task | None, Receive]:
    """A task that ends with True when the client disconnects, and the ``receive`` to hand on.

    Only for a body already read into memory (:data:`BODY_BUFFERED`): its one message is taken
    here and replayed; the next ``receive`` then only returns on a disconnect. A streamed body
    (slide uploads) is never read ahead; such a request leaves the queue by its timeout."""
    if not scope.get(BODY_BUFFERED):
        return None, receive
    first: list[Message] = []

    async def watch() -> bool:
        first.append(await receive())
        if first[0]["type"] == "http.disconnect":
            return True
        if (await receive())["type"] == "http.disconnect":
            return True
        await asyncio.Event().wait()  # an unexpected message: stop watching, keep waiting
        return False

    async def replay() -> Message:
        if first:
            return first.pop()
        return await receive()

    return asyncio.ensure_future(watch()), replay
