"""REST: ``GET /v1/models``, ``GET /v1/models/{name}``, ``POST /v1/models/{name}/predict``.

The predict body is either ``multipart/form-data`` (one or more files: PNG, JPEG, DICOM, NIfTI,
``.npy``, or what the modality reads) or JSON: a FHIR ``Binary``/``Media``/``DocumentReference``,
or ``{"inputs": [...]}`` whose items are such resources, ``{"data": base64, "contentType": …}``
objects, or modality inputs (SMILES strings, FHIR Bundles …). ``?explain=true`` adds the Grad-CAM
overlay for images (``heatmap_png``, base64) or, for other modalities, the
explanation plot (``explanation_png``) and its summary (``explanation``); ``?format=fhir``
answers with a FHIR R4 Bundle. A model with side inputs (its card's ``side_inputs``) takes
them as ``"side_inputs"`` beside ``"inputs"`` (an object, or a list with one object per input)
or as a multipart form field of that JSON; a missing value is flagged in the answer's
``notes.side_inputs.missing``, an unknown name or a bad value is a 422.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from meddx.errors import DataError, MeddxError
from meddx.fhir.resources import (
    RESEARCH_NOTICE,
    device_resource,
    risk_assessment,
    validate,
)
from meddx.serving.audit import sha256_bytes
from meddx.serving.auth import Caller
from meddx.serving.deps import State, rest_caller, state
from meddx.serving.inputs import UnsupportedMediaTypeError, Upload

__all__ = ["router", "to_fhir"]

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["predict"])

ROUTE = "/v1/models/{name}/predict"
SIDE_FIELD = "side_inputs"  # beside "inputs" (JSON) or a form field (multipart): see side_records


@router.get("/models")
def list_models(st: State = Depends(state), caller: Caller = Depends(rest_caller)) -> dict:
    """The models served, with their cards (intended use, license, research-only flag)."""
    return {"models": [m.describe() for m in st.hub.models.values()]}


@router.get("/models/{name}")
def get_model(name: str, st: State = Depends(state),
              caller: Caller = Depends(rest_caller)) -> dict:
    """One model's card."""
    return st.hub.get(name).describe()


async def _multipart(request: Request, max_batch: int) -> tuple[list[Upload], Any]:
    """The file parts, and the ``side_inputs`` field (JSON text) when there is one."""
    form = await request.form(max_files=max_batch, max_fields=16)
    uploads, side = [], None
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            uploads.append(Upload(await value.read(), value.filename, value.content_type))
        elif key == SIDE_FIELD:
            try:
                side = json.loads(value)
            except ValueError as e:
                raise DataError('the "side_inputs" field is not valid JSON',
                                hint='e.g. side_inputs={"age": 55, "sex": "female"}') from e
    await form.close()
    if not uploads:
        raise DataError("the multipart body holds no file", hint="send the image as a file part")
    return uploads, side


def side_records(value: Any, n: int, served: Any) -> tuple[list[Any], str] | None:
    """A request's ``side_inputs`` as one record per input: an object (one input) or a list
    of objects/nulls (one per input); None when the request has none.

    Raises:
        DataError: side inputs for a model without them, or the wrong shape or count.
    """
    if value is None:
        return None
    if served.card.side_inputs is None:
        raise DataError(f"model '{served.name}' takes no side inputs",
                        hint="send the input alone; GET /v1/models/{name} lists what a model "
                             "takes")
    records = [value] if isinstance(value, dict) else value
    if not isinstance(records, list) or not all(isinstance(r, dict | None) for r in records):
        raise DataError('"side_inputs" must be an object or a list of objects (one per input)',
                        hint='e.g. {"age": 55, "sex": "female"}')
    if len(records) != n:
        raise DataError(f'{len(records)} "side_inputs" records for {n} inputs',
                        hint="give one object (or null) per input, in order")
    return records, "request body"


def _json_item(item: Any, modality: Any) -> Upload | tuple[Any, str]:
    """One JSON input: ``{"data": base64, …}`` is a file; ``{"path": …}`` is refused (inputs
    are data, never names of files on the server); anything else is the modality's to
    interpret (:meth:`~meddx.modalities.base.Modality.from_json`)."""
    if isinstance(item, dict) and isinstance(item.get("data"), str) \
            and "resourceType" not in item:
        try:
            data = base64.b64decode(item["data"], validate=True)
        except (binascii.Error, TypeError, ValueError) as e:
            raise DataError("an input's data is not valid base64") from e
        name, ctype = item.get("name"), item.get("contentType")
        if not isinstance(name, str | None) or not isinstance(ctype, str | None):
            raise DataError('an input\'s "name" and "contentType" must be strings')
        return Upload(data, name, ctype)
    if isinstance(item, dict) and "path" in item and "resourceType" not in item:
        raise DataError('an input cannot name a file on the server ("path")',
                        hint='send the file itself: multipart, or {"data": base64, '
                             '"contentType": …}')
    source = modality.from_json(item)
    if isinstance(source, Upload):
        return source
    digest = sha256_bytes(json.dumps(source, sort_keys=True, default=str).encode())
    return source, digest


async def _json_items(request: Request, modality: Any
                      ) -> tuple[list[Upload | tuple[Any, str]], Any]:
    """The inputs of a JSON body, and its ``side_inputs`` (beside ``inputs``) if any."""
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError("the body is not valid JSON") from e
    except RecursionError as e:
        raise DataError("the JSON body is nested too deeply to be a FHIR resource") from e
    side = None
    if isinstance(body, dict) and "inputs" in body and "resourceType" not in body:
        items = body["inputs"]
        if not isinstance(items, list) or not items:
            raise DataError('"inputs" must be a non-empty list')
        side = body.get(SIDE_FIELD)
    else:
        items = [body]
    return [_json_item(i, modality) for i in items], side


def to_fhir(answers: list[Any], served: Any, subject: str | None = None) -> dict[str, Any]:
    """A FHIR R4 Bundle for the answers: the modality's DiagnosticReports where it reports
    that way (images), RiskAssessments for binary risks, else the modality's own ``to_fhir``."""
    card = served.card
    research = served.research_only
    modality = served.predictor.modality
    entries: list[dict[str, Any]] = []
    for a in answers:
        report = modality.fhir_report(a.prediction, card, heatmap_png=a.overlay_png,
                                      subject=subject, research_only=research)
        if report is not None:
            entries += report["entry"]
        elif card.task.kind == "binary":
            import uuid

            dev = f"urn:uuid:{uuid.uuid4()}"
            entries.append({"fullUrl": dev, "resource": device_resource(
                card, served.predictor.package.sha256, research)})
            entries.append({"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": risk_assessment(
                a.prediction, card, subject=subject, device_ref=dev, research_only=research)})
        else:
            res = served.predictor.modality.to_fhir(a.prediction, card)
            validate(res)
            entries += res["entry"] if res.get("resourceType") == "Bundle" else [
                {"resource": res}]
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": entries}
    validate(bundle)
    return bundle


def _json_answer(answers: list[Any], served: Any) -> dict[str, Any]:
    out = []
    for a in answers:
        d = a.prediction.to_dict()
        d["input_sha256"] = a.input_sha256
        if a.overlay_png is not None:
            d["heatmap_png"] = base64.b64encode(a.overlay_png).decode("ascii")
            d["explained_class"] = a.extra.get("explained_class")
        if a.image_png is not None:
            d["image_png"] = base64.b64encode(a.image_png).decode("ascii")
        if a.explanation_png is not None:
            d["explanation_png"] = base64.b64encode(a.explanation_png).decode("ascii")
            d["explained_class"] = a.extra.get("explained_class")
        if "explanation" in a.extra:
            d["explanation"] = a.extra["explanation"]
        if served.research_only:
            d["notice"] = RESEARCH_NOTICE
        out.append(d)
    body: dict[str, Any] = {"model": served.info, "predictions": out}
    if served.research_only:
        body["notice"] = RESEARCH_NOTICE
    return body


def _compute(st: State, served: Any, items: list[Any], explain: bool, fmt: str,
             caller: Caller, side: Any = None) -> dict[str, Any]:
    uploads = [i for i in items if isinstance(i, Upload)]
    digests = [sha256_bytes(u.data) for u in uploads] or [d for _, d in items]
    try:
        records = side_records(side, len(items), served)
        if len(uploads) == len(items):
            answers = served.answer(uploads, explain=explain, side_inputs=records)
        elif not uploads:
            answers = served.answer_sources([s for s, _ in items], digests, explain=explain,
                                            side_inputs=records)
        else:
            raise DataError("mix either files or modality inputs in one request, not both")
        body = to_fhir(answers, served) if fmt == "fhir" else _json_answer(answers, served)
    except MeddxError as e:
        st.audit.error(route=ROUTE, caller=caller.audit(), status=e.status_code,
                       error=type(e).__name__, model=served.name, inputs=digests)
        raise
    st.audit.prediction(route=ROUTE, caller=caller.audit(), model=served.info,
                        inputs=[a.input_sha256 for a in answers],
                        outputs=[a.prediction for a in answers],
                        extra={"format": fmt, "explain": explain})
    return body


@router.post("/models/{name}/predict")
async def predict(name: str, request: Request,
                  explain: bool = Query(False, description="add the Grad-CAM overlay (images) or the "
                                       "explanation plot and summary (other modalities)"),
                  format: Literal["json", "fhir"] = Query("json"),
                  st: State = Depends(state), caller: Caller = Depends(rest_caller)) -> Any:
    """Predict for one or more inputs (multipart files or JSON)."""
    served = st.hub.get(name)
    ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    side: Any = None
    if ctype == "multipart/form-data":
        items: list[Any]
        items, side = await _multipart(request, st.settings.max_batch)
    elif ctype in ("application/json", "application/fhir+json"):
        items, side = await _json_items(request, served.predictor.modality)
    else:
        raise UnsupportedMediaTypeError(
            f"request content type {ctype or 'none'} is not accepted",
            hint="send multipart/form-data files or application/json")
    if len(items) > st.settings.max_batch:
        raise DataError(f"{len(items)} inputs in one request; the limit is "
                        f"{st.settings.max_batch}", hint="split the batch")
    return await run_in_threadpool(_compute, st, served, items, explain, format, caller, side)
