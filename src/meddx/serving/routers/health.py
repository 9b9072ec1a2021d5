"""Liveness and readiness probes (no authentication, no data)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from meddx.serving.deps import State, state
from meddx.serving.state import StateUnavailableError

__all__ = ["router"]

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live")
def live() -> dict:
    """The process answers."""
    return {"status": "live"}


@router.get("/ready")
def ready(st: State = Depends(state)) -> JSONResponse:
    """200 once every model is loaded and warmed up (and, for a replica, its shared state
    store answers), else 503."""
    models = {m.name: m.ready for m in st.hub.models.values()}
    ok = st.hub.ready
    body = {"status": "ready" if ok else "warming", "models": models}
    if st.store is not None and st.store.shared:
        try:
            st.store.ping()
            body["state"] = "ok"
        except StateUnavailableError:
            ok, body["status"], body["state"] = False, "state store unreachable", "unreachable"
    return JSONResponse(body, status_code=200 if ok else 503,
                        headers=None if ok else {"Retry-After": "1"})
