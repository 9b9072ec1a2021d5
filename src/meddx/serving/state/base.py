"""The contract of the service's state store: what replicas of ``meddx serve`` must share.

A :class:`StateStore` holds the few things a replica cannot keep to itself once a load
balancer spreads calls over several replicas: which JWT ``jti`` were seen (a token replayed to
another replica is refused), per-caller request counters (a rate limit counts every replica),
and records and result bytes of slide jobs (any replica answers any job). Every value carries
a time to live; nothing here is kept forever.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from meddx.errors import OverloadedError

__all__ = ["StateStore", "StateUnavailableError"]


class StateUnavailableError(OverloadedError):
    """The shared state store cannot be reached (HTTP 503 with ``Retry-After``)."""

    status_code = 503


@runtime_checkable
class StateStore(Protocol):
    """Shared state of the service (see the module docstring).

    Attributes:
        name: the backend (``memory`` or ``redis``).
        shared: True when other processes see the same state.
        where: the store's address with any password removed (for logs and errors).
    """

    name: str
    shared: bool
    where: str

    def claim(self, key: str, ttl_s: float) -> bool:
        """Record ``key`` for ``ttl_s`` seconds; False when it is already recorded (or the
        store is full: it fails closed)."""

    def hit(self, key: str, window_s: int) -> tuple[int, float]:
        """Count one event in the current ``window_s`` window of ``key``: ``(count so far,
        seconds until the window ends)``."""

    def put(self, key: str, value: bytes, ttl_s: float) -> None:
        """Store ``value`` under ``key`` for ``ttl_s`` seconds."""

    def get(self, key: str) -> bytes | None:
        """The value under ``key``, or None."""

    def delete(self, *keys: str) -> None:
        """Forget ``keys``."""

    def index_add(self, index: str, member: str, score: float, ttl_s: float) -> None:
        """Add ``member`` to the ordered set ``index``."""

    def index_members(self, index: str, limit: int) -> list[str]:
        """The newest ``limit`` members of ``index`` (highest score first)."""

    def index_remove(self, index: str, member: str) -> None:
        """Take ``member`` out of ``index``."""

    def ping(self) -> None:
        """Raise :class:`StateUnavailableError` when the store cannot be reached."""

    def close(self) -> None:
        """Release connections."""


def describe(store: Any) -> dict[str, Any]:
    """``{backend, shared, where}`` for the health answer."""
    return {"backend": store.name, "shared": store.shared, "where": store.where}
