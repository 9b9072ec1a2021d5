"""Liveness and readiness probes (no authentication, no data)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from meddx.serving.deps import State, state

__all__ = ["router"]

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live")
def live() -> dict:
    """The process answers."""
    return {"status": "live"}


@router.get("/ready")
def ready(st: State = Depends(state)) -> JSONResponse:
    """200 once every model is loaded and warmed up, else 503."""
    models = {m.name: m.ready for m in st.hub.models.values()}
    ok = st.hub.ready
    return JSONResponse({"status": "ready" if ok else "warming", "models": models},
                        status_code=200 if ok else 503,
                        headers=None if ok else {"Retry-After": "1"})
