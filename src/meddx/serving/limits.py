"""ASGI limits that protect the service before any route code runs.

* :class:`BodyLimitMiddleware` — a request whose ``Content-Length`` exceeds the cap is answered
  ``413`` before one byte of its body is read; a body without a length (chunked) is read into
  memory only up to the cap. Routes (and Starlette's multipart parser, which spools uploads to
  temporary files) only ever see bodies within the cap.
* :class:`LimitsMiddleware` — at most ``max_in_flight`` requests are admitted (running or
  waiting for a worker); up to ``queue_size`` more wait in a FIFO queue for admission, and
  beyond that the answer is ``429`` with ``Retry-After``. A request waits at most
  ``queue_timeout_s`` in all before it runs: still queued then → ``429``, admitted but no worker
  free → ``503``, both with ``Retry-After``. A client that disconnects while queued leaves the
  queue. At most ``workers`` run at once; one that runs longer than ``request_timeout_s`` gets
  ``503`` and its work keeps its slot until it ends, so the bound on work in progress stays
  true.
* :class:`BodyTimeoutMiddleware` — a request body must arrive within ``total_s`` (slide
  uploads, which may be gigabytes, are exempt from the total) and with no gap longer than
  ``idle_s`` between two of its chunks; otherwise the answer is ``408`` and the connection is
  closed, so a client trickling bytes cannot hold a connection and a worker indefinitely.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from meddx.errors import ServingError

__all__ = ["BodyLimitMiddleware", "BodyTimeoutError", "BodyTimeoutMiddleware",
           "LimitsMiddleware", "json_response"]

logger = logging.getLogger(__name__)

#: scope key BodyLimitMiddleware sets when it has read the whole body (and replays it from
#: memory); only then may LimitsMiddleware read ahead while a request is queued
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


class BodyTimeoutError(ServingError):
    """The request body did not arrive in time (HTTP 408; the connection is closed)."""

    status_code = 408


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
        scope[BODY_BUFFERED] = True
        await self.app(scope, _replay(b"".join(body), receive), send)

    async def _too_large(self, send: Send, length: int | None, cap: int | None = None) -> None:
        logger.info("request body over the cap rejected (%s bytes declared)", length)
        await json_response(
            send, 413, "PayloadTooLargeError",
            f"request body is larger than the limit of {cap or self.max_bytes} bytes",
            hint="send a smaller file, or ask the operator to raise --max-body-mb",
            headers={"connection": "close"},
        )


def _replay_messages(seen: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that returns ``seen`` first, then reads on."""
    pending = deque(seen)

    async def inner() -> Message:
        return pending.popleft() if pending else await receive()

    return inner


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
    """Bounded admission with a short FIFO queue, bounded concurrency, per-request timeout.

    Args:
        app: the wrapped ASGI app.
        max_in_flight: requests admitted at once (running + waiting for a worker).
        workers: requests running at once.
        queue_timeout_s: longest wait before a request runs (queued: 429; admitted: 503).
        request_timeout_s: longest run before 503.
        retry_after_s: value of the ``Retry-After`` header.
        queue_size: requests that may wait for admission; more get 429 at once (0: no queue).
        exempt: path prefixes not limited (health probes, static files).
    """

    def __init__(self, app: ASGIApp, *, max_in_flight: int, workers: int,
                 queue_timeout_s: float, request_timeout_s: float, retry_after_s: int = 1,
                 queue_size: int = 0,
                 exempt: tuple[str, ...] = ("/health", "/static")) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.workers = workers
        self.queue_timeout_s = queue_timeout_s
        self.request_timeout_s = request_timeout_s
        self.queue_size = queue_size
        self.retry_after = {"retry-after": str(retry_after_s)}
        self.exempt = exempt
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sem: asyncio.Semaphore | None = None

    @property
    def queued(self) -> int:
        """Requests now waiting for admission."""
        return len(self._waiters)

    def _exempt(self, scope: Scope) -> bool:
        path = scope.get("path", "")
        return path == "/" or path.startswith(self.exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._exempt(scope):
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.queue_timeout_s
        admitted, receive = await self._admit(scope, receive)
        if admitted is None:  # the client left while queued
            return
        if not admitted:
            await json_response(send, 429, "OverloadedError",
                                "too many requests in progress; retry shortly",
                                headers=self.retry_after)
            return
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.workers)
        try:
            await asyncio.wait_for(self._sem.acquire(),
                                   timeout=max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            self._leave()
            await json_response(send, 503, "OverloadedError",
                                "the service is busy; retry shortly", headers=self.retry_after)
            return
        await self._run(scope, receive, send)

    async def _admit(self, scope: Scope, receive: Receive) -> tuple[bool | None, Receive]:
        """Take an admission slot, waiting in the FIFO queue if there is room.

        Returns ``(True, receive)`` when admitted (the slot is held), ``(False, receive)``
        when refused, ``(None, receive)`` when the client disconnected while queued. While
        queued, a body already read into memory (:data:`BODY_BUFFERED`) is taken from its
        replay, so that a disconnect is seen, and replayed to the app. A streamed body (slide
        uploads, up to ``--max-slide-mb``) is never read ahead, which would hold it in memory:
        such a request leaves the queue when it is admitted or by the timeout.
        """
        if self.in_flight < self.max_in_flight and not self.queued:
            self.in_flight += 1
            return True, receive
        if self.queued >= self.queue_size:
            return False, receive
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        seen: list[Message] = []

        async def watch() -> None:
            while True:
                message = await receive()
                seen.append(message)
                if message["type"] == "http.disconnect":
                    return

        watcher = asyncio.ensure_future(watch()) if scope.get(BODY_BUFFERED) else None
        try:
            done, _ = await asyncio.wait({slot} if watcher is None else {slot, watcher},
                                         timeout=self.queue_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled while queued
            if watcher is not None:
                watcher.cancel()
            self._forget(slot)
            raise
        if watcher is not None:
            watcher.cancel()
        if watcher is not None and watcher in done:  # the client left (or its channel failed) while queued
            if not watcher.cancelled():
                watcher.exception()  # retrieved: a failed channel is a disconnect here
            self._forget(slot)
            return None, receive
        if slot.done():
            return True, _replay_messages(seen, receive)
        self._forget(slot)
        return False, receive

    def _forget(self, slot: asyncio.Future[None]) -> None:
        """Take a waiter off the queue; a slot it was just handed passes on."""
        if slot.done() and not slot.cancelled():
            self._leave()
            return
        slot.cancel()
        self._waiters.remove(slot)  # not yet handed a slot, so still queued

    def _leave(self) -> None:
        """Give an admission slot to the first waiter, or free it."""
        if self._waiters:
            self._waiters.popleft().set_result(None)  # the slot passes on; in_flight stays
            return
        self.in_flight -= 1

    def _release(self, task: asyncio.Task) -> None:
        self._leave()
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


class BodyTimeoutMiddleware:
    """Answer ``408`` to a request whose body arrives too slowly (see the module docstring).

    The wrapped ``receive`` raises :class:`BodyTimeoutError`; raised while the body is read
    here or by :class:`BodyLimitMiddleware`, this middleware answers; raised inside a route
    that streams the body (slide uploads), the app's error handler answers it. Either way the
    answer carries ``Connection: close``.

    Args:
        app: the wrapped ASGI app.
        total_s: longest time from the request's arrival to the body's last byte.
        idle_s: longest wait for the next chunk of the body.
        streamed: compiled path patterns whose POST bodies only get the idle timeout.
    """

    def __init__(self, app: ASGIApp, total_s: float, idle_s: float,
                 streamed: tuple[Any, ...] = ()) -> None:
        self.app = app
        self.total_s = total_s
        self.idle_s = idle_s
        self.streamed = streamed

    def _timed(self, scope: Scope, receive: Receive, fired: dict[str, bool]) -> Receive:
        is_streamed = scope.get("method") == "POST" and any(
            p.match(scope.get("path", "")) for p in self.streamed)
        deadline = None if is_streamed else time.monotonic() + self.total_s
        done = False

        async def inner() -> Message:
            nonlocal done
            if done:  # the body is complete: later reads wait for a disconnect, untimed
                return await receive()
            wait = self.idle_s if deadline is None else min(self.idle_s,
                                                            deadline - time.monotonic())
            try:
                if wait <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(receive(), timeout=wait)
            except TimeoutError:
                fired["yes"] = True
                limit = (f"{self.total_s:g} s" if deadline is not None
                         and deadline - time.monotonic() <= 0 else f"{self.idle_s:g} s idle")
                logger.info("request body too slow on %s (limit %s); answered 408",
                            scope.get("path"), limit)
                raise BodyTimeoutError(
                    f"the request body did not arrive in time (limit {limit})",
                    hint="send the whole body at once on a working connection; the operator "
                         "sets the limit with --body-timeout-s / --body-idle-timeout-s") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                done = True
            return message

        return inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        fired = {"yes": False}
        started = False

        async def closing_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if fired["yes"]:
                    message = {**message, "headers": [
                        *[(k, v) for k, v in message.get("headers", [])
                          if k.lower() != b"connection"], (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, self._timed(scope, receive, fired), closing_send)
        except BodyTimeoutError as e:
            if started:
                raise
            await json_response(send, 408, "BodyTimeoutError", e.message, hint=e.hint,
                                headers={"connection": "close"})
