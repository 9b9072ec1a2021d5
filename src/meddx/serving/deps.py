"""FastAPI dependencies shared by the routers: the service state and the caller."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request

from meddx.serving.auth import Authenticator, Caller
from meddx.serving.settings import ServeSettings

__all__ = ["State", "state", "rest_caller", "cds_caller", "endpoint_url"]


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


def rest_caller(request: Request) -> Caller:
    """A REST or web-page caller: an API key, or a JWT whose ``aud`` is this endpoint's URL
    (or the service's base URL)."""
    st = state(request)
    caller = st.auth.authenticate(request.headers.get("authorization"),
                                  [endpoint_url(request), st.settings.base_url])
    request.state.caller = caller
    return caller


def cds_caller(request: Request) -> Caller:
    """A CDS Hooks caller: a JWT only, ``aud`` = the exact URL of the service called."""
    st = state(request)
    url = endpoint_url(request)
    audiences = [url]
    if url.endswith("/feedback"):
        audiences.append(url[: -len("/feedback")])
    caller = st.auth.authenticate(request.headers.get("authorization"), audiences,
                                  allow_api_key=False)
    request.state.caller = caller
    return caller
