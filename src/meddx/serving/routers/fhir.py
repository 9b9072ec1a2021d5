"""FHIR R4 surface: ``GET /fhir/metadata`` and ``POST /fhir/{model}/$predict``.

``$predict`` takes a FHIR ``Binary``, ``Media`` or ``DocumentReference`` (or what the model's
modality reads, e.g. a Bundle or an Observation) and answers with a FHIR R4 Bundle — the same as
``POST /v1/models/{model}/predict?format=fhir``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from meddx.fhir.resources import validate
from meddx.serving.auth import Caller
from meddx.serving.deps import State, rest_caller, state
from meddx.serving.routers.predict import predict
from meddx.version import __version__

__all__ = ["router"]

router = APIRouter(prefix="/fhir", tags=["fhir"])
FHIR_JSON = "application/fhir+json"


@router.get("/metadata")
def metadata(st: State = Depends(state)) -> JSONResponse:
    """A CapabilityStatement (R4) describing the ``$predict`` operation."""
    cs = {
        "resourceType": "CapabilityStatement", "status": "active",
        "date": datetime.now(UTC).date().isoformat(), "kind": "instance",
        "software": {"name": "meddx", "version": __version__},
        "implementation": {"description": "meddx clinical service",
                           "url": st.settings.url_for("/fhir")},
        "fhirVersion": "4.0.1", "format": ["json"],
        "rest": [{"mode": "server", "documentation": "POST /fhir/{model}/$predict with a "
                  "Binary, Media or DocumentReference; answers a Bundle "
                  "(DiagnosticReport + Observation + Media, or RiskAssessment)."}],
    }
    validate(cs)
    return JSONResponse(cs, media_type=FHIR_JSON)


@router.post("/{name}/$predict")
async def fhir_predict(name: str, request: Request, explain: bool = Query(True),
                       st: State = Depends(state),
                       caller: Caller = Depends(rest_caller)) -> JSONResponse:
    """Predict from a FHIR resource; answer a FHIR Bundle."""
    body: Any = await predict(name, request, explain=explain, format="fhir", st=st,
                              caller=caller)
    return JSONResponse(body, media_type=FHIR_JSON)
