"""Prometheus metrics of the service (``GET /metrics``) and the middleware that feeds them.

Every app has its own :class:`prometheus_client.CollectorRegistry`, so several services in one
process (tests, benchmarks) never mix their counts. Series, all labelled by the model that
answered (the card's name; empty for requests that named no served model):

* ``meddx_requests_total{model,route,status}`` — answered requests (route = the route
  template, e.g. ``/v1/models/{name}/predict``, never the raw URL);
* ``meddx_request_seconds{model,route}`` — latency histogram, from the first byte received
  to the answer (queueing in the concurrency limiter included);
* ``meddx_errors_total{model,route,error}`` — requests answered with an error (the
  :mod:`meddx.errors` class, ``HTTP<code>`` for errors raised outside it) and CDS Hooks calls
  that failed safe with no card;
* ``meddx_predictions_total{model,decision}`` — answered inputs by decision at the card's
  operating point (the predicted label when the card has none);
* ``meddx_ood_total{model}`` — answers flagged out-of-distribution (``prediction.ood``);
* ``meddx_model_info{model,version,sha256,backend,modality}`` (1) and
  ``meddx_model_ready{model}``.

Every request, with or without metrics, gets a fresh ``X-Request-ID`` (a random UUID the
audit log records; outcomes are joined to predictions by it).

Access (``ServeSettings.metrics``): ``auth`` (default) — a bearer API key or JWT, as the REST
API; ``open`` — no authentication (for a scraper on a private network; the series hold
counts and model names, never patient data); ``off`` — no endpoint and no counting.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meddx.serving import context

__all__ = ["ServiceMetrics", "MonitorMiddleware", "metrics_router", "LATENCY_BUCKETS"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServiceMetrics:
    """The service's Prometheus series, in a registry of its own.

    Args:
        hub: the :class:`~meddx.serving.engine.ModelHub` (model names and cards).
        services: CDS Hooks service id → model name.
    """

    def __init__(self, hub: Any, services: dict[str, str] | None = None) -> None:
        self.hub = hub
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("meddx_requests", "Answered requests.",
                                ["model", "route", "status"], registry=r)
        self.latency = Histogram("meddx_request_seconds", "Request latency in seconds.",
                                 ["model", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("meddx_errors", "Requests answered with an error, and CDS calls "
                              "that failed safe with no card.", ["model", "route", "error"],
                              registry=r)
        self.predictions = Counter("meddx_predictions", "Answered inputs by decision.",
                                   ["model", "decision"], registry=r)
        self.ood = Counter("meddx_ood", "Answers flagged out-of-distribution.", ["model"],
                           registry=r)
        self.info = Gauge("meddx_model_info", "The models served (value 1).",
                          ["model", "version", "sha256", "backend", "modality"], registry=r)
        self.ready = Gauge("meddx_model_ready", "1 once the model is warmed up.", ["model"],
                           registry=r)
        self.models = set(hub.models)
        self.services = dict(services or {})
        for name, m in hub.models.items():
            info = m.info
            self.info.labels(name, info["version"], info["sha256"], info["backend"],
                             m.modality).set(1)
            self.ood.labels(name)  # present at 0 from the start

    def model_label(self, ctx: context.RequestContext | None, params: dict[str, Any]) -> str:
        """The model that answered, else the served model the URL names, else ``""``
        (an unknown name in a URL must not become a new series)."""
        if ctx is not None and ctx.model in self.models:
            return ctx.model  # type: ignore[return-value]
        name = params.get("name")
        if name in self.models:
            return name  # type: ignore[return-value]
        return self.services.get(params.get("service_id", ""), "")

    def observe(self, route: str, model: str, status: int, seconds: float,
                ctx: context.RequestContext | None) -> None:
        """Count one answered request."""
        self.requests.labels(model, route, str(status)).inc()
        self.latency.labels(model, route).observe(seconds)
        error = ctx.error if ctx is not None else None
        if error is None and status >= 400:
            error = f"HTTP{status}"
        if error is not None:
            self.errors.labels(model, route, error).inc()
        if ctx is not None and ctx.outputs:
            for decision, ood in ctx.outputs:
                self.predictions.labels(model, decision or "none").inc()
                if ood:
                    self.ood.labels(model).inc()

    def exposition(self) -> bytes:
        """The registry in Prometheus text format (readiness refreshed first)."""
        for name, m in self.hub.models.items():
            self.ready.labels(name).set(1 if m.ready else 0)
        return generate_latest(self.registry)


def _route_of(routes: list[Any], scope: Scope) -> tuple[str, dict[str, Any]]:
    """Route template and path parameters, also for requests answered before routing."""
    route = scope.get("route")
    if route is not None and hasattr(route, "path"):
        return route.path, scope.get("path_params", {})
    for r in routes:
        match, child = r.matches(scope)
        if match == Match.FULL:
            return getattr(r, "path", "unmatched") or "unmatched", child.get("path_params", {})
    return "unmatched", {}


class MonitorMiddleware:
    """Outermost layer: opens the request's :class:`~meddx.serving.context.RequestContext`,
    adds ``X-Request-ID`` to the answer and, with ``metrics``, counts the request.

    Args:
        app: the wrapped ASGI app.
        routes: the FastAPI app's routes (to name requests refused before routing).
        metrics: the service's :class:`ServiceMetrics`, or None (no counting).
    """

    def __init__(self, app: ASGIApp, routes: list[Any],
                 metrics: ServiceMetrics | None = None) -> None:
        self.app = app
        self.routes = routes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        ctx, token = context.open_context()
        header = (b"x-request-id", ctx.request_id.encode("ascii"))
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException as e:
            context.note_error(type(e).__name__)
            raise
        finally:
            context.close_context(token)
            if self.metrics is not None:
                route, params = _route_of(self.routes, scope)
                self.metrics.observe(route, self.metrics.model_label(ctx, params), status,
                                     time.perf_counter() - start, ctx)


def metrics_router(metrics: ServiceMetrics, mode: str) -> APIRouter:
    """``GET /metrics``; behind the REST authentication unless ``mode`` is ``open``."""
    from meddx.serving.deps import rest_caller

    router = APIRouter(tags=["monitoring"])
    deps = [] if mode == "open" else [Depends(rest_caller)]

    @router.get("/metrics", dependencies=deps, include_in_schema=True)
    def scrape(request: Request) -> Response:
        """Prometheus text exposition of the service's counters and histograms."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return router
