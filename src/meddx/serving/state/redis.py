"""The Redis state store, shared by every replica that names the same ``redis://`` URL.

Keys live under one prefix (``meddx:`` by default). A claim is ``SET key 1 NX PX ttl``; a rate
window is ``INCR`` + ``PEXPIRE`` in one transaction; records and result bytes are plain values
with a time to live; job lists are sorted sets. Every Redis failure becomes a
:class:`~meddx.serving.state.base.StateUnavailableError` (HTTP 503 with a hint): a replica
whose Redis is gone refuses what needs it, and recovers by itself when Redis is back.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

from meddx.errors import ConfigError
from meddx.serving.state.base import StateUnavailableError

__all__ = ["RedisStore", "redact"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


def redact(url: str) -> str:
    """``url`` without its password (for logs and error messages)."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:@/]*):[^@/]*@", r"\1:***@", url)


class RedisStore:
    """:class:`~meddx.serving.state.base.StateStore` on a Redis server.

    Args:
        url: ``redis://[:password@]host:port/db``, ``rediss://…`` (TLS) or
            ``unix:///path/redis.sock``.
        prefix: namespace of every key (replicas of one service share it).
        timeout_s: socket connect and read timeout.
    """

    name, shared = "redis", True

    def __init__(self, url: str, prefix: str = "meddx:", timeout_s: float = 2.0) -> None:
        try:
            import redis
        except ImportError as e:
            raise ConfigError("--state redis://… needs the redis client",
                              hint="pip install 'meddx[cluster]'") from e
        self.where = redact(url)
        self.prefix = prefix
        self._errors = (redis.exceptions.RedisError, OSError)
        try:
            self._r = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                           socket_connect_timeout=timeout_s,
                                           health_check_interval=30)
        except ValueError as e:
            raise ConfigError(f"invalid --state URL {self.where!r}: {e}",
                              hint="e.g. redis://127.0.0.1:6379/0") from e

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except self._errors as e:
            logger.error("state store %s failed (%s): %s", self.where, what, type(e).__name__)
            raise StateUnavailableError(
                "the service's shared state store is unreachable",
                hint=f"the operator should check Redis at {self.where}; the replica recovers "
                     "by itself once it answers again") from e

    def _k(self, key: str) -> str:
        return self.prefix + key

    def claim(self, key: str, ttl_s: float) -> bool:
        ms = max(1, int(ttl_s * 1000))
        return bool(self._call("claim", lambda: self._r.set(self._k(key), b"1", nx=True,
                                                            px=ms)))

    def hit(self, key: str, window_s: int) -> tuple[int, float]:
        now = time.time()
        window = int(now // window_s)
        k = self._k(f"{key}:{window}")

        def run() -> Any:
            pipe = self._r.pipeline(transaction=True)
            pipe.incr(k)
            pipe.pexpire(k, int(window_s * 1000) + 1000)
            return pipe.execute()

        count = int(self._call("rate", run)[0])
        return count, (window + 1) * window_s - now

    def put(self, key: str, value: bytes, ttl_s: float) -> None:
        ms = max(1, int(ttl_s * 1000))
        self._call("put", lambda: self._r.set(self._k(key), value, px=ms))

    def get(self, key: str) -> bytes | None:
        return self._call("get", lambda: self._r.get(self._k(key)))

    def delete(self, *keys: str) -> None:
        if keys:
            self._call("delete", lambda: self._r.delete(*(self._k(k) for k in keys)))

    def index_add(self, index: str, member: str, score: float, ttl_s: float) -> None:
        k = self._k(index)

        def run() -> Any:
            pipe = self._r.pipeline(transaction=True)
            pipe.zadd(k, {member: score})
            pipe.pexpire(k, max(1, int(ttl_s * 1000)))
            return pipe.execute()

        self._call("index", run)

    def index_members(self, index: str, limit: int) -> list[str]:
        raw = self._call("index", lambda: self._r.zrevrange(self._k(index), 0, limit - 1))
        return [m.decode() if isinstance(m, bytes) else str(m) for m in raw]

    def index_remove(self, index: str, member: str) -> None:
        self._call("index", lambda: self._r.zrem(self._k(index), member))

    def ping(self) -> None:
        self._call("ping", self._r.ping)

    def close(self) -> None:
        with contextlib.suppress(self._errors):
            self._r.close()
