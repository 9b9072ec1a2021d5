"""Asynchronous jobs for inputs too large for one request (whole-slide images).

:class:`JobQueue` holds jobs in memory and their files under a folder the server owns
(mode 0700): a worker pool of ``workers`` threads (one job per core by default) takes queued
jobs in order; at most ``max_queued`` wait, and one more is refused with 429 and
``Retry-After``. A job runs to its end whether or not its client is still there; it can be
cancelled while queued (never started) or running (it stops at the next tile batch). An
uploaded slide is deleted as soon as its job ends; results (heat map PNG, FHIR Bundle) stay
until the job is deleted or pushed out by newer ones (``keep_finished``).

With a shared state store (``meddx serve --state redis://…``), every job's record — status,
progress, result, error — and, once it succeeded, its result pictures (the PNG bytes) are
also written to the store with a time to live (``ttl_s``), so that any replica lists, polls,
fetches, cancels and deletes any job. A job still runs on the replica that received it (its
uploaded slide stays on that replica's disk): a cancel sent to another replica sets a flag in
the store that the running job sees at its next tile batch.
"""

from __future__ import annotations

import hashlib
import json
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

__all__ = ["Job", "JobQueue", "QueueFullError", "FINAL", "PICTURES"]

logger = logging.getLogger(__name__)

FINAL = ("succeeded", "failed", "cancelled")
#: result pictures a job may leave in its folder (and, shared, in the store)
PICTURES = ("heatmap.png", "gallery.png")


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
    replica: str | None = None
    local: bool = True
    notify: Callable[[Job], None] | None = field(default=None, repr=False)

    def progress(self, done: int, total: int) -> None:
        """Tiles embedded so far (called by the worker)."""
        self.done, self.total, self.stage = done, total, "embedding tiles"
        if self.notify is not None:
            self.notify(self)

    _SHARED = ("id", "model", "owner", "status", "created", "started", "finished", "done",
               "total", "stage", "result", "error", "replica")

    def record(self) -> bytes:
        """The job as the shared store holds it (no paths)."""
        return json.dumps({k: getattr(self, k) for k in self._SHARED}).encode()

    @classmethod
    def from_record(cls, raw: bytes) -> Job:
        """A view of a job another replica runs (its files are not here)."""
        data = json.loads(raw)
        return cls(folder=Path(), slide=Path(), owned_slide=False, local=False,
                   **{k: data.get(k) for k in cls._SHARED if k in data})

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
        if self.replica is not None:
            out["replica"] = self.replica
        return out


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    from datetime import UTC, datetime

    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


class _SharedCancel(threading.Event):
    """A job's cancel flag that also reads the store's flag (set by another replica), at
    most once a second."""

    def __init__(self, store: Any, key: str) -> None:
        super().__init__()
        self._store, self._key, self._checked = store, key, 0.0

    def is_set(self) -> bool:
        if super().is_set():
            return True
        now = time.monotonic()
        if now - self._checked >= 1.0:
            self._checked = now
            try:
                if self._store.get(self._key) is not None:
                    self.set()
            except MeddxError:  # the store is down: the job runs on
                pass
        return super().is_set()


class JobQueue:
    """A bounded queue of jobs and its worker threads.

    Args:
        root: folder for job files (created 0700; a fresh temporary folder when None, removed
            with everything in it by :meth:`close`).
        workers: jobs running at once.
        max_queued: jobs waiting at once; one more gets :class:`QueueFullError`.
        run: ``run(job) -> result dict``, called on a worker thread.
        keep_finished: finished jobs kept (oldest dropped, with their files).
        store: a shared :class:`~meddx.serving.state.StateStore` (None, or one not shared:
            jobs live in this process only).
        replica: this replica's name (recorded with each job).
        ttl_s: how long a job's record and result pictures stay in the shared store.
    """

    def __init__(self, root: Path | None, workers: int, max_queued: int,
                 run: Callable[[Job], dict[str, Any]], keep_finished: int = 200,
                 store: Any = None, replica: str | None = None, ttl_s: int = 86400) -> None:
        self._owns_root = not root
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="meddx-jobs-"))
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.max_queued, self.keep_finished, self._run = max_queued, keep_finished, run
        self._store = store if store is not None and store.shared else None
        self.replica, self.ttl_s = replica, ttl_s
        self._published: dict[str, float] = {}
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
        """Queue a job (raises :class:`QueueFullError` past the queue's size, and
        :class:`~meddx.serving.state.StateUnavailableError` when the shared store is down)."""
        job = Job(id=uuid.uuid4().hex, model=model, owner=owner, folder=folder,
                  slide=slide, owned_slide=owned_slide, mpp=mpp, replica=self.replica)
        if self._store is not None:
            job.cancel = _SharedCancel(self._store, f"jobcancel:{job.id}")
            job.notify = self._progressed
        with self._lock:
            if sum(j.status == "queued" for j in self._jobs.values()) >= self.max_queued:
                raise QueueFullError(f"the job queue is full ({self.max_queued} waiting)",
                                     hint="retry later")
            self._jobs[job.id] = job
            self._forget_old()
        if self._store is not None:
            try:  # shared before it is queued: no replica may be told of an unknown job
                self._store.put(f"job:{job.id}", job.record(), self.ttl_s)
                self._store.index_add(_index(owner), job.id, job.created, self.ttl_s)
            except MeddxError:
                with self._lock:
                    self._jobs.pop(job.id, None)
                raise
        self._queue.put(job)
        logger.info("job %s queued for %s", job.id, model)
        return job

    def get(self, job_id: str, owner: str | None = None, model: str | None = None) -> Job:
        """The job (404 for an unknown id, another caller's job, or another model's)."""
        with self._lock:
            job = self._jobs.get(job_id)
        if self._store is not None and (job is None or job.status in FINAL):
            raw = self._store.get(f"job:{job_id}") if _valid_id(job_id) else None
            job = None if raw is None else (job or Job.from_record(raw))
        if job is None or (owner is not None and job.owner != owner) or \
                (model is not None and job.model != model):
            raise NotFoundError(f"no job '{job_id}'", hint="jobs are kept for a limited time")
        return job

    def for_owner(self, owner: str, model: str | None = None, limit: int = 100) -> list[Job]:
        """The caller's jobs, newest first (on every replica sharing the store)."""
        if self._store is None:
            with self._lock:
                jobs = [j for j in reversed(self._jobs.values()) if j.owner == owner]
        else:
            jobs = []
            for job_id in self._store.index_members(_index(owner), limit):
                try:
                    jobs.append(self.get(job_id, owner))
                except NotFoundError:
                    self._store.index_remove(_index(owner), job_id)
        return [j for j in jobs if model is None or j.model == model][:limit]

    def cancel(self, job: Job) -> Job:
        """Stop a queued or running job (a finished one is left as it is)."""
        if self._store is not None:
            self._store.put(f"jobcancel:{job.id}", b"1", self.ttl_s)
        if not job.local:  # another replica runs it: it sees the flag at its next step
            if job.status == "queued":  # it will not start it (its worker reads the flag)
                job.status, job.finished, job.stage = "cancelled", time.time(), "cancelled"
                self._store.put(f"job:{job.id}", job.record(), self.ttl_s)
            elif job.status == "running":
                job.stage = "cancelling"
            return job
        with self._lock:
            if job.status == "queued":
                self._finish(job, "cancelled")
            elif job.status == "running":
                job.stage = "cancelling"
        job.cancel.set()
        return job

    def delete(self, job: Job) -> None:
        """Forget a finished job and remove its files (and its shared record)."""
        with self._lock:
            self._jobs.pop(job.id, None)
        if job.local:
            shutil.rmtree(job.folder, ignore_errors=True)
        if self._store is not None:
            self._store.delete(f"job:{job.id}", f"jobcancel:{job.id}",
                               *(f"jobpic:{job.id}:{n}" for n in PICTURES))
            self._store.index_remove(_index(job.owner), job.id)

    def picture(self, job: Job, name: str) -> bytes | None:
        """A result picture's bytes (``heatmap.png`` …), from here or the shared store."""
        path = job.folder / name
        if job.local and path.is_file():
            return path.read_bytes()
        if self._store is not None:
            return self._store.get(f"jobpic:{job.id}:{name}")
        return None

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
            cancelled = job.cancel.is_set()  # (a shared flag is read outside the lock)
            with self._lock:
                if job.status != "queued":
                    continue
                if cancelled:
                    self._finish(job, "cancelled")
                else:
                    job.status, job.started, job.stage = "running", time.time(), "reading slide"
            self._publish(job)
            if not cancelled:
                self._execute(job)
                self._publish(job)
                logger.info("job %s ended: %s", job.id, job.status)

    def _execute(self, job: Job) -> None:
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
        except Exception:  # noqa: BLE001 - a worker must survive any job
            logger.exception("job %s failed", job.id)
            with self._lock:
                job.error = {"error": "InternalError",
                             "message": "internal error while running the job",
                             "hint": "the operator's log has the details", "status": 500}
                self._finish(job, "failed")
        else:
            if not job.cancel.is_set():
                self._share_pictures(job)
            with self._lock:
                if job.cancel.is_set():
                    self._finish(job, "cancelled")
                else:
                    job.result = result
                    self._finish(job, "succeeded")

    # ----------------------------------------------------------------- sharing
    def _publish(self, job: Job) -> None:
        """Write the job's record to the shared store (a failure is logged: the job runs on
        and its next state is written when the store is back)."""
        if self._store is None:
            return
        self._published[job.id] = time.monotonic()
        try:
            self._store.put(f"job:{job.id}", job.record(), self.ttl_s)
        except MeddxError as e:
            logger.warning("job %s: state not shared (%s)", job.id, e.message)

    def _progressed(self, job: Job) -> None:
        if time.monotonic() - self._published.get(job.id, 0.0) >= 0.5:
            self._publish(job)

    def _share_pictures(self, job: Job) -> None:
        if self._store is None:
            return
        for name in PICTURES:
            path = job.folder / name
            if path.is_file():
                try:
                    self._store.put(f"jobpic:{job.id}:{name}", path.read_bytes(), self.ttl_s)
                except MeddxError as e:
                    logger.warning("job %s: %s not shared (%s)", job.id, name, e.message)

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
            self._published.pop(j.id, None)
            shutil.rmtree(j.folder, ignore_errors=True)


def _index(owner: str) -> str:
    """The store's list of one caller's jobs (named by a digest, never the caller)."""
    return "jobs:" + hashlib.sha256(owner.encode()).hexdigest()[:32]


def _valid_id(job_id: str) -> bool:
    return len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id)
