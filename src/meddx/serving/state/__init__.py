"""Where the service keeps the state its replicas share (``meddx serve --state URL``).

:func:`open_state` picks a :class:`StateStore` by the URL's scheme from :data:`BACKENDS`:
none (or ``memory://``) keeps everything in this process, as a single service always did;
``redis://``, ``rediss://`` and ``unix://`` share it through Redis, so that several replicas
behind a load balancer refuse a replayed JWT, count one rate limit and answer any slide job.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meddx.errors import ConfigError
from meddx.serving.state.base import StateStore, StateUnavailableError, describe
from meddx.serving.state.memory import MemoryStore, ReplayCache

__all__ = ["StateStore", "StateUnavailableError", "MemoryStore", "ReplayCache", "open_state",
           "BACKENDS", "describe"]


def _redis(url: str, **kw: Any) -> StateStore:
    from meddx.serving.state.redis import RedisStore

    return RedisStore(url)


def _memory(url: str, max_claims: int = 100_000) -> StateStore:
    return MemoryStore(max_claims)


#: URL scheme → factory ``(url, max_claims=…) -> StateStore``
BACKENDS: dict[str, Callable[..., StateStore]] = {
    "memory": _memory, "redis": _redis, "rediss": _redis, "unix": _redis}


def open_state(url: str | None, max_claims: int = 100_000) -> StateStore:
    """The state store named by ``url`` (None: this process's memory).

    Raises:
        ConfigError: an unknown scheme, a malformed URL, or the redis client missing.
    """
    if not url:
        return MemoryStore(max_claims)
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    factory = BACKENDS.get(scheme)
    if factory is None:
        raise ConfigError(f"--state {url.split('@')[-1]!r}: unknown state store",
                          hint=f"give one of {', '.join(s + '://' for s in BACKENDS)}, e.g. "
                               "redis://127.0.0.1:6379/0")
    return factory(url, max_claims=max_claims)
