"""Jobs for whole-slide images: ``POST /v1/models/{name}/jobs`` → 202 + ``Location``;
``GET …/jobs/{id}`` for progress and the result; ``GET …/jobs`` lists the caller's jobs; ``DELETE …/jobs/{id}`` to cancel (or, once
finished, to delete its files); ``GET …/jobs/{id}/heatmap.png`` and ``…/gallery.png``.

The body is the slide itself (``application/octet-stream`` or ``image/tiff``, streamed to the
job's private folder; a ``multipart/form-data`` file part also works) or JSON
``{"path": "...", "mpp": 0.25}`` naming a file under one of the server's ``--slide-root``
folders (anything resolving outside them, symbolic links included, is refused with 403).
``?slide_mpp=`` gives the level-0 µm per pixel of a slide whose file does not say.

Checked before a job is queued: the queue has room (429 + ``Retry-After``), the slide is at
most ``max_slide_bytes`` (413), the slide opens and has a resolution (422 with the reason).
The result holds the slide probability, the Prediction, links to the heat map and gallery
PNGs, and a FHIR R4B Bundle (DiagnosticReport + Media with the heat map). Only the caller that
submitted a job sees it. The slide's label and macro images are never read.

With ``meddx serve --state redis://…`` the job records and result pictures are shared through
the store (see :mod:`meddx.serving.jobs`), so every replica answers every route here for any
job; a job runs on the replica that received it.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from meddx.errors import (
    DataError,
    InputMismatchError,
    NotFoundError,
    PayloadTooLargeError,
    ServingError,
)
from meddx.redaction import reading_user_data
from meddx.serving.auth import Caller
from meddx.serving.deps import State, rest_caller, state
from meddx.serving.inputs import UnsupportedMediaTypeError
from meddx.serving.jobs import FINAL, Job, JobQueue

__all__ = ["router", "UPLOAD_PATH", "job_queue"]

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["jobs"])

UPLOAD_PATH = re.compile(r"^/v1/models/[^/]+/jobs/?$")
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".svslide", ".dcm")
ROUTE = "/v1/models/{name}/jobs"


class ForbiddenPathError(ServingError):
    """A server-side path outside the allowed slide folders (HTTP 403)."""

    status_code = 403


def _owner(caller: Caller) -> str:
    return json.dumps(caller.audit(), sort_keys=True)


def job_queue(request: Request) -> JobQueue:
    """The app's job queue (made on first use; its workers run :func:`run_job`)."""
    app = request.app
    jobs = getattr(app.state, "meddx_jobs", None)
    if jobs is None:
        st: State = app.state.meddx
        s = st.settings
        jobs = JobQueue(s.job_dir, s.jobs_workers, s.jobs_queue, lambda job: run_job(st, job),
                        store=st.store, replica=s.replica, ttl_s=s.job_ttl_s)
        app.state.meddx_jobs = jobs
    return jobs


# ----------------------------------------------------------------------------- the work
def _check_source(served: Any, slide: Path, mpp: float | None) -> None:
    with reading_user_data():
        served.predictor.modality.check_job_source(slide, served.card.preprocessing,
                                                   {"mpp": mpp})


def run_job(st: State, job: Job) -> dict[str, Any]:
    """Read, embed, classify and explain one slide (on a worker thread)."""
    from meddx.models.explain import combined_explainer
    from meddx.serving.audit import sha256_bytes

    served = st.hub.get(job.model)
    predictor, card = served.predictor, served.card
    with reading_user_data():  # the slide reader's own messages stay out of the log
        sample = predictor.modality.read_job(job.slide, card.preprocessing, {"mpp": job.mpp},
                                             progress=job.progress, cancel=job.cancel)
    sample.id = job.id  # never the file name
    job.stage = "classifying"
    pred = predictor.predict_samples([sample])[0]
    job.stage = "explaining"
    explainer = combined_explainer(predictor.modality, predictor.model, card.preprocessing,
                                   task=card.task)
    attention = explainer.explain(sample)
    heat = explainer.heatmap_png(sample, attention)
    (job.folder / "heatmap.png").write_bytes(heat)
    gallery = explainer.gallery_png(sample, attention)
    if gallery is not None:
        (job.folder / "gallery.png").write_bytes(gallery)
    n_tiles = int(sample.meta["n_tiles"])
    bundle = predictor.modality.fhir_report(pred, card, heatmap_png=heat, n_tiles=n_tiles,
                                            research_only=served.research_only)
    base = f"/v1/models/{job.model}/jobs/{job.id}"
    body = pred.to_dict()
    body.pop("id", None)
    result = {"probability": pred.risk if pred.risk is not None else body["probabilities"],
              "prediction": body, "n_tiles": n_tiles,
              "slide_mpp": sample.meta.get("slide_mpp"), "tile_mpp": sample.meta.get("tile_mpp"),
              "explanation": explainer.summary(sample, attention),
              "heatmap_png": f"{base}/heatmap.png",
              "gallery_png": f"{base}/gallery.png" if gallery is not None else None,
              "fhir": bundle}
    st.audit.prediction(route=ROUTE, caller=json.loads(job.owner), model=served.info,
                        inputs=[str(sample.meta.get("slide_sha256"))], outputs=[pred],
                        extra={"job": job.id, "heatmap_sha256": sha256_bytes(heat)})
    return result


# ------------------------------------------------------------------------------ inputs
def _allowed_path(st: State, raw: Any) -> Path:
    roots = [Path(r).resolve() for r in st.settings.slide_roots]
    if not roots:
        raise ForbiddenPathError("this service reads no server-side slide paths",
                                 hint="upload the slide, or start the service with --slide-root")
    if not isinstance(raw, str) or not raw or "\x00" in raw:
        raise DataError('"path" must be a non-empty string')
    p = Path(raw)
    candidates = [p] if p.is_absolute() else [r / p for r in roots]
    for c in candidates:
        real = c.resolve()
        if any(real.is_relative_to(r) for r in roots):
            if not real.is_file():
                raise NotFoundError("no such slide under the slide roots")
            return real
    raise ForbiddenPathError("the path is outside the folders this service may read",
                             hint="give a path under one of the --slide-root folders")


async def _stream_body(request: Request, target: Path, cap: int) -> int:
    size = 0
    with target.open("wb") as f:
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise PayloadTooLargeError(f"the slide is larger than the limit of {cap} bytes",
                                           hint="use --slide-root paths, or ask the operator "
                                                "to raise --max-slide-mb")
            f.write(chunk)
    if size == 0:
        raise DataError("the request body is empty", hint="send the slide file as the body")
    return size


async def _multipart_file(request: Request, target_dir: Path, cap: int) -> Path:
    form = await request.form(max_files=1, max_fields=4)
    try:
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise DataError("the multipart body holds no file", hint="send the slide as a file")
        up = files[0]
        target = target_dir / ("slide" + _suffix(up.filename))
        with target.open("wb") as f:
            size = 0
            while chunk := await up.read(1 << 20):
                size += len(chunk)
                if size > cap:
                    raise PayloadTooLargeError(
                        f"the slide is larger than the limit of {cap} bytes")
                f.write(chunk)
        return target
    finally:
        await form.close()


def _suffix(name: str | None) -> str:
    s = Path(name or "").suffix.lower()
    return s if s in SLIDE_SUFFIXES else ".tiff"


# ------------------------------------------------------------------------------ routes
@router.post("/models/{name}/jobs", status_code=202)
async def submit_job(name: str, request: Request,
                     slide_mpp: float | None = Query(None, gt=0, description="level-0 µm/px "
                                                     "of a slide whose file does not say"),
                     st: State = Depends(state),
                     caller: Caller = Depends(rest_caller)) -> JSONResponse:
    """Queue a slide: answers 202 with the job and its ``Location``."""
    served = st.hub.get(name)
    if not served.predictor.modality.reads_in_jobs:
        raise InputMismatchError(f"model '{name}' takes no jobs (its inputs are small enough "
                                 "for a request)",
                                 hint="use POST /v1/models/{name}/predict")
    jobs = job_queue(request)
    jobs.check_room()  # before reading a large upload
    cap = st.settings.max_slide_bytes
    ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    folder = jobs.new_folder()
    try:
        mpp, owned = slide_mpp, True
        if ctype in ("application/json", "application/fhir+json"):
            try:
                body = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError) as e:
                raise DataError("the body is not valid JSON") from e
            if not isinstance(body, dict) or "path" not in body:
                raise DataError('a JSON body is {"path": "…"[, "mpp": µm per pixel]}')
            slide, owned = _allowed_path(st, body["path"]), False
            if slide.stat().st_size > cap:
                raise PayloadTooLargeError(f"the slide is larger than the limit of {cap} bytes")
            mpp = mpp or (float(body["mpp"]) if body.get("mpp") else None)
        elif ctype == "multipart/form-data":
            slide = await _multipart_file(request, folder, cap)
        elif ctype in ("application/octet-stream", "image/tiff", "application/dicom"):
            slide = folder / ("slide" + _suffix(request.query_params.get("filename")))
            await _stream_body(request, slide, cap)
        else:
            raise UnsupportedMediaTypeError(
                f"request content type {ctype or 'none'} is not accepted",
                hint="send the slide as application/octet-stream, a multipart file, or JSON "
                     '{"path": …} for a slide under --slide-root')
        await run_in_threadpool(_check_source, served, slide, mpp)
        job = jobs.submit(name, _owner(caller), folder, slide, owned, mpp)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    location = f"/v1/models/{name}/jobs/{job.id}"
    return JSONResponse(job.describe(), status_code=202, headers={"Location": location})


@router.get("/models/{name}/jobs")
def list_jobs(name: str, request: Request, st: State = Depends(state),
              caller: Caller = Depends(rest_caller)) -> JSONResponse:
    """The caller's jobs for this model, newest first (status and progress of each)."""
    st.hub.get(name)
    jobs = job_queue(request).for_owner(_owner(caller), name)
    return JSONResponse({"jobs": [j.describe() for j in jobs]})


@router.get("/models/{name}/jobs/{job_id}")
def get_job(name: str, job_id: str, request: Request,
            caller: Caller = Depends(rest_caller)) -> JSONResponse:
    """Status, progress, and the result once it has succeeded (or the error)."""
    job = job_queue(request).get(job_id, _owner(caller), name)
    headers = {} if job.status in FINAL else {"Retry-After": "1"}
    return JSONResponse(job.describe(), headers=headers)


@router.delete("/models/{name}/jobs/{job_id}")
def cancel_job(name: str, job_id: str, request: Request,
               caller: Caller = Depends(rest_caller)) -> JSONResponse:
    """Cancel a queued or running job (202); a finished one is deleted with its files (200)."""
    jobs = job_queue(request)
    job = jobs.get(job_id, _owner(caller), name)
    if job.status in FINAL:
        jobs.delete(job)
        return JSONResponse({"id": job.id, "status": "deleted"})
    jobs.cancel(job)
    return JSONResponse(job.describe(), status_code=202)


@router.get("/models/{name}/jobs/{job_id}/{picture}")
def job_picture(name: str, job_id: str, picture: str, request: Request,
                caller: Caller = Depends(rest_caller)) -> Response:
    """The job's heat map (``heatmap.png``) or top-tiles gallery (``gallery.png``)."""
    if picture not in ("heatmap.png", "gallery.png"):
        raise NotFoundError(f"no '{picture}'", hint="heatmap.png or gallery.png")
    jobs = job_queue(request)
    job = jobs.get(job_id, _owner(caller), name)
    data = jobs.picture(job, picture) if job.status == "succeeded" else None
    if data is None:
        raise NotFoundError(f"job '{job_id}' has no {picture}",
                            hint=f"the job is {job.status}")
    return Response(data, media_type="image/png")
