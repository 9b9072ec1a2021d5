"""Asynchronous jobs for inputs too large for one request (whole-slide images).

:class:`JobQueue` holds jobs in memory and their files under a folder the server owns
(mode 0700): a worker pool of ``workers`` threads (one job per core by default) takes queued
jobs in order; at most ``max_queued`` wait, and one more is refused with 429 and
``Retry-After``. A job runs to its end whether or not its client is still there; it can be
cancelled while queued (never started) or running (it stops at the next tile batch). An
uploaded slide is deleted as soon as its job ends; results (heat map PNG, FHIR Bundle) stay
until the job is deleted or pushed out by newer ones (``keep_finished``).
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meddx.errors import MeddxError, NotFoundError, OverloadedError

__all__ = ["Job", "JobQueue", "QueueFullError", "FINAL"]

logger = logging.getLogger(__name__)

FINAL = ("succeeded", "failed", "cancelled")


class QueueFullError(OverloadedError):
    """The job queue is full (HTTP 429 with ``Retry-After``)."""

    status_code = 429


@dataclass
class Job:
    """One job. ``owner`` is the caller's audit identity (only the owner sees the job)."""

    id: str
    model: str
    owner: str
    folder: Path
    slide: Path
    owned_slide: bool
    mpp: float | None = None
    status: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    done: int = 0
    total: int | None = None
    stage: str = "queued"
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def progress(self, done: int, total: int) -> None:
        """Tiles embedded so far (called by the worker)."""
        self.done, self.total, self.stage = done, total, "embedding tiles"

    def describe(self) -> dict[str, Any]:
        """What ``GET …/jobs/{id}`` answers (never the slide's name or path)."""
        frac = 1.0 if self.status == "succeeded" else (
            self.done / self.total if self.total else 0.0)
        out: dict[str, Any] = {
            "id": self.id, "model": self.model, "status": self.status, "stage": self.stage,
            "progress": round(frac, 4), "tiles_done": self.done, "tiles_total": self.total,
            "created": _iso(self.created), "started": _iso(self.started),
            "finished": _iso(self.finished)}
        if self.result is not None:
            out["result"] = self.result
        if self.error is not None:
            out["error"] = self.error
        return out


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    from datetime import UTC, datetime

    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


class JobQueue:
    """A bounded queue of jobs and its worker threads.

    Args:
        root: folder for job files (created 0700; a fresh temporary folder when None, removed
            with everything in it by :meth:`close`).
        workers: jobs running at once.
        max_queued: jobs waiting at once; one more gets :class:`QueueFullError`.
        run: ``run(job) -> result dict``, called on a worker thread.
        keep_finished: finished jobs kept (oldest dropped, with their files).
    """

    def __init__(self, root: Path | None, workers: int, max_queued: int,
                 run: Callable[[Job], dict[str, Any]], keep_finished: int = 200) -> None:
        self._owns_root = not root
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="meddx-jobs-"))
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.max_queued, self.keep_finished, self._run = max_queued, keep_finished, run
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._threads = [threading.Thread(target=self._work, name=f"meddx-job-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    # ----------------------------------------------------------------- clients
    def new_folder(self) -> Path:
        """A private folder for a job about to be submitted (its upload goes here)."""
        return Path(tempfile.mkdtemp(prefix="job-", dir=self.root))

    def queued(self) -> int:
        with self._lock:
            return sum(j.status == "queued" for j in self._jobs.values())

    def check_room(self) -> None:
        """Raise :class:`QueueFullError` when no job could be queued now."""
        if self.queued() >= self.max_queued:
            raise QueueFullError(f"the job queue is full ({self.max_queued} waiting)",
                                 hint="retry later")

    def submit(self, model: str, owner: str, folder: Path, slide: Path, owned_slide: bool,
               mpp: float | None = None) -> Job:
        """Queue a job (raises :class:`QueueFullError` past the queue's size)."""
        with self._lock:
            if sum(j.status == "queued" for j in self._jobs.values()) >= self.max_queued:
                raise QueueFullError(f"the job queue is full ({self.max_queued} waiting)",
                                     hint="retry later")
            job = Job(id=uuid.uuid4().hex, model=model, owner=owner, folder=folder,
                      slide=slide, owned_slide=owned_slide, mpp=mpp)
            self._jobs[job.id] = job
            self._forget_old()
        self._queue.put(job)
        logger.info("job %s queued for %s", job.id, model)
        return job

    def get(self, job_id: str, owner: str | None = None, model: str | None = None) -> Job:
        """The job (404 for an unknown id, another caller's job, or another model's)."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or (owner is not None and job.owner != owner) or \
                (model is not None and job.model != model):
            raise NotFoundError(f"no job '{job_id}'", hint="jobs are kept for a limited time")
        return job

    def cancel(self, job: Job) -> Job:
        """Stop a queued or running job (a finished one is left as it is)."""
        with self._lock:
            if job.status == "queued":
                self._finish(job, "cancelled")
            elif job.status == "running":
                job.stage = "cancelling"
        job.cancel.set()
        return job

    def delete(self, job: Job) -> None:
        """Forget a finished job and remove its files."""
        with self._lock:
            self._jobs.pop(job.id, None)
        shutil.rmtree(job.folder, ignore_errors=True)

    def close(self) -> None:
        """Cancel everything, stop the workers and remove the folder this queue made."""
        with self._lock:
            jobs = list(self._jobs.values())
        for j in jobs:
            if j.status not in FINAL:
                self.cancel(j)
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=5)
        if self._owns_root:  # a folder the operator named (--job-dir) is theirs to keep
            shutil.rmtree(self.root, ignore_errors=True)

    # ----------------------------------------------------------------- workers
    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                if job.status != "queued":
                    continue
                job.status, job.started, job.stage = "running", time.time(), "reading slide"
            try:
                result = self._run(job)
            except MeddxError as e:
                with self._lock:
                    if job.cancel.is_set():
                        self._finish(job, "cancelled")
                    else:
                        job.error = {"error": type(e).__name__, "message": e.message,
                                     "hint": e.hint, "status": int(e.status_code)}
                        self._finish(job, "failed")
                logger.info("job %s ended: %s", job.id, job.status)
            except Exception:  # noqa: BLE001 - a worker must survive any job
                logger.exception("job %s failed", job.id)
                with self._lock:
                    job.error = {"error": "InternalError",
                                 "message": "internal error while running the job",
                                 "hint": "the operator's log has the details", "status": 500}
                    self._finish(job, "failed")
            else:
                with self._lock:
                    if job.cancel.is_set():
                        self._finish(job, "cancelled")
                    else:
                        job.result = result
                        self._finish(job, "succeeded")
                logger.info("job %s ended: %s", job.id, job.status)

    def _finish(self, job: Job, status: str) -> None:
        job.status, job.finished, job.stage = status, time.time(), status
        if job.owned_slide:  # an uploaded slide never outlives its job
            try:
                job.slide.unlink(missing_ok=True)
            except OSError as e:
                logger.warning("could not remove the slide of job %s: %s", job.id, e)

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.status in FINAL]
        for j in finished[: max(0, len(finished) - self.keep_finished)]:
            self._jobs.pop(j.id, None)
            shutil.rmtree(j.folder, ignore_errors=True)
