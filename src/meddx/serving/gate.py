"""What every request passes before a route sees it: the caller's credentials, CORS, and the
headers every answer carries.

* :class:`AuthGateMiddleware` — a request to a route that needs a caller (a route depending on
  :func:`~meddx.serving.deps.rest_caller` or :func:`~meddx.serving.deps.cds_caller`) is
  authenticated from its headers alone, before one byte of its body is read; a refusal is
  ``401`` with ``Connection: close``, so an anonymous client cannot make the service read or
  spool an upload. The caller found is handed to the route through the ASGI scope, so a JWT is
  checked (and its ``jti`` recorded) once. Which routes need which caller is read from the
  routes themselves: a public route (health probes, the web page, static files, signed
  heat-map links, ``GET /fhir/metadata``) stays public without a list kept here.
* :class:`SecurityHeadersMiddleware` — every answer says ``X-Content-Type-Options: nosniff``,
  ``Referrer-Policy: no-referrer`` and a restrictive ``Content-Security-Policy``; every answer
  but static assets says ``Cache-Control: no-store`` (predictions, FHIR resources, CDS cards,
  heat maps and job results carry patient data and must not stay in a browser or proxy cache).
  A response that sets one of these itself (the web page, the API docs) keeps its own.
* :class:`CorsMiddleware` — Starlette's CORS for an explicit origin allow-list (browser-based
  CDS clients), whose refused preflights answer ``{error, message, hint}`` like every refusal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meddx.errors import AuthError
from meddx.serving import context
from meddx.serving.deps import (
    CALLER_KEY,
    cds_audiences,
    cds_caller,
    rest_audiences,
    rest_caller,
)

__all__ = ["AuthGateMiddleware", "SecurityHeadersMiddleware", "CorsMiddleware",
           "unauthorized", "API_CSP", "route_auth"]

logger = logging.getLogger(__name__)

#: the policy of answers that set none (JSON, PNG, FHIR): nothing may load or frame them
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'"
_CACHEABLE = ("/static/", "/docs-assets/")


def unauthorized(close: bool = False) -> JSONResponse:
    """The one answer to a failed authentication (it never says which check failed)."""
    headers = {"WWW-Authenticate": "Bearer"}
    if close:
        headers["Connection"] = "close"
    return JSONResponse({"error": "unauthorized", "message": "authentication required",
                         "hint": None}, status_code=401, headers=headers)


def _calls(dependant: Any) -> Iterable[Callable[..., Any]]:
    for dep in getattr(dependant, "dependencies", ()):
        if dep.call is not None:
            yield dep.call
        yield from _calls(dep)


def route_auth(route: Any) -> str | None:
    """``"rest"``, ``"cds"`` or None (public): which caller ``route`` depends on."""
    calls = set(_calls(getattr(route, "dependant", None)))
    if cds_caller in calls:
        return "cds"
    if rest_caller in calls:
        return "rest"
    return None


class AuthGateMiddleware:
    """Authenticate from the headers before the body is read (see the module docstring).

    Args:
        app: the wrapped ASGI app.
        fastapi_app: the FastAPI app whose routes (and ``state.meddx``) are consulted.
    """

    def __init__(self, app: ASGIApp, fastapi_app: Any) -> None:
        self.app = app
        self.fastapi_app = fastapi_app
        self._table: list[tuple[Any, frozenset[str], str | None, Any]] | None = None

    def _routes(self) -> list[tuple[Any, frozenset[str], str | None, Any]]:
        """``(path regex, methods, auth kind, route)`` of every route, in the router's order
        (FastAPI may hold included routers as lazy groups: they are flattened here)."""
        if self._table is None:
            table = []
            for item in self.fastapi_app.router.routes:
                expand = getattr(item, "effective_route_contexts", None)
                for route in (expand() if expand is not None else (item,)):
                    regex = getattr(route, "path_regex", None)
                    methods = getattr(route, "methods", None)
                    if regex is not None and methods and hasattr(route, "dependant"):
                        table.append((regex, frozenset(methods), route_auth(route), route))
            self._table = table
        return self._table

    def _match(self, scope: Scope) -> tuple[str | None, Any, dict[str, str]]:
        """The auth kind, the route and its path parameters of the route ``scope`` calls."""
        path, method = scope.get("path", ""), scope.get("method", "")
        for regex, methods, kind, route in self._routes():
            found = regex.match(path) if method in methods else None
            if found:
                return kind, route, found.groupdict()
        return None, None, {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        kind, route, params = self._match(scope)
        if kind is None:
            await self.app(scope, receive, send)
            return
        st = self.fastapi_app.state.meddx
        path = scope.get("path", "")
        audiences = (cds_audiences if kind == "cds" else rest_audiences)(st.settings, path)
        try:  # a jku fetch may block: off the event loop, as FastAPI runs a sync dependency
            caller = await run_in_threadpool(
                st.auth.authenticate, Headers(scope=scope).get("authorization"), audiences,
                allow_api_key=kind == "rest")
        except AuthError:
            context.note_error("AuthError")
            # answered before routing: name the route for the monitoring layer
            scope.setdefault("route", route)
            scope.setdefault("path_params", params)
            await unauthorized(close=True)(scope, receive, send)
            return
        scope[CALLER_KEY] = (kind, caller)
        await self.app(scope, receive, send)


class SecurityHeadersMiddleware:
    """Add the headers every answer must carry, where the response did not set its own."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope.get("path", "").startswith(_CACHEABLE)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                raw = list(message.get("headers", []))
                have = {k.lower() for k, _ in raw}
                extra = [(b"x-content-type-options", b"nosniff"),
                         (b"referrer-policy", b"no-referrer"),
                         (b"content-security-policy", API_CSP.encode())]
                if not static:
                    extra.append((b"cache-control", b"no-store"))
                raw += [(k, v) for k, v in extra if k not in have]
                message = {**message, "headers": raw}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class CorsMiddleware(CORSMiddleware):
    """Starlette's CORS with the service's refusal body (a refused preflight is ``403``
    ``{error, message, hint}`` and carries no ``Access-Control-Allow-*`` header)."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        what = bytes(response.body).decode().removeprefix("Disallowed CORS ")
        logger.info("CORS preflight refused (%s)", what)
        return JSONResponse(
            {"error": "CorsRefusedError",
             "message": f"cross-origin request refused: {what} not allowed",
             "hint": "the operator lists allowed browser origins with --cors-origin; "
                     "allowed request headers are Authorization and Content-Type"},
            status_code=403, headers={"Vary": "Origin"})
