"""What one request leaves behind for monitoring: its id, the model, its error, its answers.

:class:`~meddx.serving.metrics.MonitorMiddleware` opens a :class:`RequestContext` for every
request (a context variable, so it follows the request into the thread pool); the engine adds
the statistics of each model input, the audit log reads the request id and those statistics
from it and records what was answered, the exception handler records the error — and after the
answer the middleware turns it into Prometheus counters. Outside a request (the CLI, tests that
call the engine directly) there is no context and every call here is a no-op.
"""

from __future__ import annotations

import contextvars
import uuid
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RequestContext", "current", "open_context", "note_error", "note_inputs",
           "note_outputs", "new_request_id"]


@dataclass
class RequestContext:
    """One request's monitoring record.

    Attributes:
        request_id: the service's id of the request (a random UUID, sent back in
            ``X-Request-ID``); never taken from the caller, so it cannot carry a patient id.
        error: the error class answered (or the fail-safe's), None when none.
        model: the model that answered (from the audit log).
        input_stats: per input, :func:`meddx.training.reference.input_stats` (or None).
        outputs: ``(decision, ood)`` per answered input (the label where the model has no
            operating point).
    """

    request_id: str
    error: str | None = None
    model: str | None = None
    input_stats: list[dict[str, float] | None] = field(default_factory=list)
    outputs: list[tuple[str | None, bool]] = field(default_factory=list)


_CURRENT: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "meddx_request", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def open_context() -> tuple[RequestContext, contextvars.Token]:
    """Start a request's record; pass the token to ``_CURRENT.reset`` when it ends."""
    ctx = RequestContext(request_id=new_request_id())
    return ctx, _CURRENT.set(ctx)


def close_context(token: contextvars.Token) -> None:
    _CURRENT.reset(token)


def current() -> RequestContext | None:
    """The record of the request being answered, or None outside a request."""
    return _CURRENT.get()


def note_error(name: str) -> None:
    """Record the error class a request was answered with (the first one named wins)."""
    ctx = _CURRENT.get()
    if ctx is not None and ctx.error is None:
        ctx.error = name


def note_inputs(tensors: list[Any]) -> None:
    """Record the statistics of each model input (only inside a request)."""
    ctx = _CURRENT.get()
    if ctx is None:
        return
    from meddx.training.reference import input_stats

    ctx.input_stats = [input_stats(t) for t in tensors]


def note_outputs(model: str | None, outputs: list[Any]) -> None:
    """Record the model and, per answer, its decision and out-of-distribution flag."""
    ctx = _CURRENT.get()
    if ctx is None:
        return
    ctx.model = model
    for o in outputs:
        get = o.get if isinstance(o, dict) else lambda k, o=o: getattr(o, k, None)
        decision = get("decision")
        if not isinstance(decision, str):  # no operating point (or multilabel): the label
            decision = get("label")
        ctx.outputs.append((decision if isinstance(decision, str) else None,
                            get("ood") is True))
