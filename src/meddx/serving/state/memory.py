"""The in-memory state store: one process's state, as the service always kept it."""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["MemoryStore", "ReplayCache"]

logger = logging.getLogger(__name__)


class ReplayCache:
    """``(iss, jti)`` pairs seen, each kept until ``expires``; bounded, thread-safe.

    When full of unexpired entries it refuses new ones (fails closed) rather than forgetting.
    """

    def __init__(self, max_size: int = 100_000) -> None:
        self.max_size = max_size
        self._seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def add(self, iss: str, jti: str, expires: float, now: float | None = None) -> bool:
        """Record a token id; False when it was seen before (a replay) or the cache is full."""
        now = time.time() if now is None else now
        key = (iss, jti)
        with self._lock:
            if key in self._seen and self._seen[key] >= now:
                return False
            if len(self._seen) >= self.max_size:
                self._seen = {k: v for k, v in self._seen.items() if v >= now}
                if len(self._seen) >= self.max_size:
                    logger.warning("JWT replay cache is full; refusing new tokens")
                    return False
            self._seen[key] = expires
            return True

    def __len__(self) -> int:
        return len(self._seen)


class MemoryStore:
    """:class:`~meddx.serving.state.base.StateStore` in this process's memory.

    Args:
        max_claims: claims kept at once (the JWT replay cache's size); when full of live
            claims a new one is refused (fails closed).
    """

    name, shared, where = "memory", False, "this process"

    def __init__(self, max_claims: int = 100_000) -> None:
        self._claims = ReplayCache(max_claims)
        self._values: dict[str, tuple[bytes, float]] = {}
        self._windows: dict[str, tuple[int, int]] = {}
        self._index: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()

    def claim(self, key: str, ttl_s: float) -> bool:
        now = time.time()
        return self._claims.add("", key, now + ttl_s, now=now)

    def hit(self, key: str, window_s: int) -> tuple[int, float]:
        now = time.time()
        window = int(now // window_s)
        with self._lock:
            start, count = self._windows.get(key, (window, 0))
            count = count + 1 if start == window else 1
            self._windows[key] = (window, count)
            if len(self._windows) > 10_000:  # drop callers whose window has passed
                self._windows = {k: v for k, v in self._windows.items() if v[0] == window}
        return count, (window + 1) * window_s - now

    def put(self, key: str, value: bytes, ttl_s: float) -> None:
        with self._lock:
            self._values[key] = (value, time.time() + ttl_s)

    def get(self, key: str) -> bytes | None:
        with self._lock:
            found = self._values.get(key)
            if found is None or found[1] < time.time():
                self._values.pop(key, None)
                return None
            return found[0]

    def delete(self, *keys: str) -> None:
        with self._lock:
            for k in keys:
                self._values.pop(k, None)

    def index_add(self, index: str, member: str, score: float, ttl_s: float) -> None:
        with self._lock:
            self._index.setdefault(index, {})[member] = score

    def index_members(self, index: str, limit: int) -> list[str]:
        with self._lock:
            members = self._index.get(index, {})
            return sorted(members, key=members.__getitem__, reverse=True)[:limit]

    def index_remove(self, index: str, member: str) -> None:
        with self._lock:
            self._index.get(index, {}).pop(member, None)

    def ping(self) -> None:
        return None

    def close(self) -> None:
        return None
