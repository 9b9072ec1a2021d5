"""The imaging worklist: ``GET /v1/worklist`` — studies by priority, then risk.

The worklist is kept by the DICOM node (``meddx dicom listen`` / ``watch``) in its work folder;
the service reads it from there (``--dicom-work``), so a PACS worklist, a dashboard or an EHR
integration can ask for it over HTTP. ``?format=fhir`` answers a FHIR R4B ``Bundle`` of ``Task``
resources (priority stat/urgent/routine, the ImagingStudy as focus). Study Instance UIDs are
left out unless the caller asks (``?study_uid=true``): the salted study key names the study
everywhere else.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from meddx.errors import NotFoundError
from meddx.serving.auth import Caller
from meddx.serving.deps import State, rest_caller, state

__all__ = ["router"]

router = APIRouter(tags=["worklist"])


@router.get("/v1/worklist")
def worklist(format: Literal["json", "fhir"] = Query("json"),
             study_uid: bool = Query(False, description="include Study Instance UIDs"),
             st: State = Depends(state), caller: Caller = Depends(rest_caller)) -> JSONResponse:
    """The worklist of the DICOM node's work folder, most urgent first."""
    from meddx.dicom.worklist import load_worklist, to_fhir_bundle, worklist_json

    work = st.settings.dicom_work
    if work is None:
        raise NotFoundError("this service has no imaging worklist",
                          hint="start it with --dicom-work DIR (the --work folder of "
                               "`meddx dicom listen` or `meddx dicom watch`)")
    db = work / "state.sqlite"
    if format == "fhir":
        return JSONResponse(to_fhir_bundle(load_worklist(db, include_uid=study_uid)),
                            media_type="application/fhir+json")
    return JSONResponse(worklist_json(db, include_uid=study_uid))
