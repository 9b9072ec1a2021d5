"""FastAPI dependencies shared by the routers: the service state and the caller.

The caller is normally authenticated once, from the headers, by
:class:`~meddx.serving.gate.AuthGateMiddleware` before any of the body is read; it leaves the
:class:`Caller` in the ASGI scope (:data:`CALLER_KEY`) and the dependencies here take it from
there, so that a JWT's ``jti`` is recorded in the replay cache once, not twice. Without the
gate (an app built by hand in a test) they authenticate themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request

from meddx.serving.auth import Authenticator, Caller
from meddx.serving.settings import ServeSettings

__all__ = ["State", "state", "rest_caller", "cds_caller", "endpoint_url", "rest_audiences",
           "cds_audiences", "CALLER_KEY"]

#: ASGI scope key holding ``(kind, Caller)`` the gate authenticated, kind ``"rest"`` or
#: ``"cds"`` (set by the server only; a client cannot write the scope)
CALLER_KEY = "meddx.caller"


@dataclass
class State:
    """Everything a route needs, held on ``app.state.meddx``."""

    settings: ServeSettings
    hub: Any  # ModelHub
    auth: Authenticator
    audit: Any  # AuditLog
    heatmaps: Any  # HeatmapStore
    feedback: Any  # FeedbackStore


def state(request: Request) -> State:
    return request.app.state.meddx


def endpoint_url(request: Request) -> str:
    """The exact public URL of the endpoint called (no query), the JWT audience."""
    return state(request).settings.url_for(request.url.path)


def rest_audiences(settings: ServeSettings, path: str) -> list[str]:
    """JWT audiences a REST call to ``path`` accepts: the endpoint's URL or the base URL."""
    return [settings.url_for(path), settings.base_url]


def cds_audiences(settings: ServeSettings, path: str) -> list[str]:
    """JWT audiences a CDS Hooks call to ``path`` accepts: the exact URL of the service
    called (feedback: also the service's own URL)."""
    url = settings.url_for(path)
    return [url, url[: -len("/feedback")]] if url.endswith("/feedback") else [url]


def _gated(request: Request, kind: str) -> Caller | None:
    gated = request.scope.get(CALLER_KEY)
    if gated is None or gated[0] != kind:
        return None
    request.state.caller = gated[1]
    return gated[1]


def rest_caller(request: Request) -> Caller:
    """A REST or web-page caller: an API key, or a JWT whose ``aud`` is this endpoint's URL
    (or the service's base URL)."""
    gated = _gated(request, "rest")
    if gated is not None:
        return gated
    st = state(request)
    caller = st.auth.authenticate(request.headers.get("authorization"),
                                  rest_audiences(st.settings, request.url.path))
    request.state.caller = caller
    return caller


def cds_caller(request: Request) -> Caller:
    """A CDS Hooks caller: a JWT only, ``aud`` = the exact URL of the service called."""
    gated = _gated(request, "cds")
    if gated is not None:
        return gated
    st = state(request)
    caller = st.auth.authenticate(request.headers.get("authorization"),
                                  cds_audiences(st.settings, request.url.path),
                                  allow_api_key=False)
    request.state.caller = caller
    return caller
