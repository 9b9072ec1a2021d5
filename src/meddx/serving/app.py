"""The app factory: ``create_app(packages, settings) -> FastAPI``.

Layers, outermost first: monitoring (request id, metrics), the security headers every answer
carries (``nosniff``, ``no-store`` …), CORS for the allow-listed browser origins (none by
default), authentication from the headers (401 before any of the body is read), the body-read
timeout (408), the body cap (413 before anything is read or spooled), the
concurrency/timeout limits (429/503 with ``Retry-After``), then FastAPI with exception
handlers mapping the :mod:`meddx.errors` tree and the framework's own refusals (malformed
multipart, unknown route, invalid parameters) to status codes with ``{error, message, hint}``
(authentication failures are a bare 401 that never says which check failed).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from meddx.errors import AuthError, MeddxError, OverloadedError
from meddx.serving import context
from meddx.serving.apidocs import install_api_docs
from meddx.serving.audit import AuditLog, default_audit_path
from meddx.serving.auth import Authenticator
from meddx.serving.cds import FeedbackStore
from meddx.serving.deps import State
from meddx.serving.engine import ModelHub
from meddx.serving.gate import (
    AuthGateMiddleware,
    CorsMiddleware,
    SecurityHeadersMiddleware,
    unauthorized,
)
from meddx.serving.heatmaps import HeatmapStore
from meddx.serving.limits import BodyLimitMiddleware, BodyTimeoutMiddleware, LimitsMiddleware
from meddx.serving.metrics import MonitorMiddleware, ServiceMetrics, metrics_router
from meddx.serving.routers import cds_hooks, fhir, health, jobs, predict, ui
from meddx.serving.settings import ServeSettings
from meddx.version import __version__

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

_PUBLIC_5XX = {503, 412}
#: the framework's own refusals (routing, multipart parsing, parameters), named and explained
_HTTP_ERRORS = {
    400: ("BadRequest", "check the request: a multipart body needs a boundary in its "
          "Content-Type and well-formed parts, within the file and field limits"),
    404: ("NotFound", "see GET /v1/models for the models and the docs for the endpoints"),
    405: ("MethodNotAllowed", "see the docs for the methods each endpoint takes"),
    413: ("PayloadTooLargeError", "send a smaller body"),
    415: ("UnsupportedMediaTypeError", "send multipart/form-data or JSON"),
}


def _error_response(exc: MeddxError) -> JSONResponse:
    if isinstance(exc, AuthError):
        return unauthorized()
    status = int(getattr(exc, "status_code", 500))
    body = {"error": type(exc).__name__, "message": exc.message, "hint": exc.hint}
    if status >= 500 and status not in _PUBLIC_5XX:
        logger.error("internal error: %s", exc)
        body = {"error": type(exc).__name__, "message": "internal error in the service",
                "hint": "the operator's log has the details"}
    headers = {"Retry-After": "1"} if isinstance(exc, OverloadedError) else None
    return JSONResponse(body, status_code=status, headers=headers)


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(MeddxError)
    async def meddx_error(request: Request, exc: MeddxError) -> JSONResponse:
        context.note_error(type(exc).__name__)
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error, hint = _HTTP_ERRORS.get(exc.status_code, (f"HTTP{exc.status_code}", None))
        message = exc.detail if isinstance(exc.detail, str) else "the request was refused"
        return JSONResponse({"error": error, "message": message, "hint": hint},
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # where and what, never the value sent (it may hold patient data)
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}"
                             for e in exc.errors()[:5])
        return JSONResponse({"error": "ValidationError",
                             "message": f"invalid request: {problems}",
                             "hint": "see the docs for the parameters this endpoint takes"},
                            status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"error": "InternalError", "message": "internal error in the service",
                             "hint": "the operator's log has the details"}, status_code=500)


def _lifespan(st: State):  # noqa: ANN202
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if st.settings.warmup:
            threading.Thread(target=st.hub.warmup, name="meddx-warmup", daemon=True).start()
        else:
            for m in st.hub.models.values():
                m.ready = True
        if st.settings.insecure_no_auth:
            logger.warning("!!! meddx serves WITHOUT AUTHENTICATION (--insecure-no-auth); "
                           "loopback only, for local demos — never expose this service !!!")
        yield
        st.audit.close()
        st.heatmaps.close()
        if getattr(app.state, "meddx_jobs", None) is not None:
            app.state.meddx_jobs.close()

    return lifespan


def create_app(packages: list[Any], settings: ServeSettings | None = None,
               authenticator: Authenticator | None = None) -> FastAPI:
    """Build the service for ``packages`` (folders or Predictors).

    Args:
        packages: model package folders (``runs/x/model``) or loaded Predictors.
        settings: limits, trust and paths (defaults: loopback, 20 MB body cap …).
        authenticator: a prepared :class:`Authenticator` (tests inject clocks/fetchers).

    Raises:
        ConfigError: duplicate model names, research-only model without ``research_use``,
            or no way to authenticate (no API keys, no issuers, not ``insecure_no_auth``).
        ModelError: with ``settings.trust_keys``, a package unsigned, signed by another key,
            or changed since signing (see :mod:`meddx.signing`).
    """
    from meddx.errors import ConfigError

    settings = settings or ServeSettings()
    if not (settings.api_keys or settings.issuers or settings.insecure_no_auth):
        raise ConfigError("the service would accept no caller",
                          hint="give --api-key-file and/or --cds-jwks (or --insecure-no-auth "
                               "for a loopback demo)")
    hub = ModelHub(list(packages), settings)
    audit_path = settings.audit_log or default_audit_path()
    st = State(
        settings=settings, hub=hub, auth=authenticator or Authenticator(settings),
        audit=AuditLog(audit_path, fsync=settings.audit_fsync),
        heatmaps=HeatmapStore(settings.heatmap_dir, settings.link_secret, settings.heatmap_ttl_s),
        feedback=FeedbackStore(settings.feedback_log
                               or Path(audit_path).with_name("cds-feedback.jsonl")),
    )
    app = FastAPI(title="meddx clinical service", version=__version__,
                  description="REST, FHIR R4 and CDS Hooks 2.0 for meddx model packages.",
                  lifespan=_lifespan(st), docs_url=None, redoc_url=None)
    app.state.meddx = st
    _install_handlers(app)
    for r in (predict.router, jobs.router, fhir.router, cds_hooks.router, health.router, ui.router):
        app.include_router(r)
    metrics = None
    if settings.metrics != "off":
        metrics = ServiceMetrics(hub, {sid: served.name for sid, (served, _, _)
                                       in cds_hooks.services(st).items()})
        app.include_router(metrics_router(metrics, settings.metrics))
    static = resources.files("meddx.serving").joinpath("static")
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    if settings.api_docs:
        install_api_docs(app)
    _add_middleware(app, settings, metrics)
    app.state.metrics = metrics
    return app


def _add_middleware(app: FastAPI, settings: ServeSettings,
                    metrics: ServiceMetrics | None) -> None:
    """The ASGI layers, innermost first (each added one wraps those before it)."""
    app.add_middleware(LimitsMiddleware, max_in_flight=settings.max_in_flight,
                       workers=settings.workers, queue_timeout_s=settings.queue_timeout_s,
                       request_timeout_s=settings.request_timeout_s,
                       retry_after_s=settings.retry_after_s,
                       queue_size=settings.admission_queue,
                       exempt=("/health", "/static", "/metrics"))
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       streamed={jobs.UPLOAD_PATH: settings.max_slide_bytes})
    app.add_middleware(BodyTimeoutMiddleware, total_s=settings.body_timeout_s,
                       idle_s=settings.body_idle_timeout_s, streamed=(jobs.UPLOAD_PATH,))
    app.add_middleware(AuthGateMiddleware, fastapi_app=app)
    if settings.cors_origins:
        app.add_middleware(CorsMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["X-Request-ID", "Retry-After", "Location"],
                           allow_credentials=False, max_age=600)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(MonitorMiddleware, routes=app.routes, metrics=metrics)
