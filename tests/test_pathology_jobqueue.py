"""The job queue behind ``/v1/models/{name}/jobs``: order, bound, cancel, failures (real
threads; the work is a function of the test)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from meddx.errors import DataError
from meddx.modalities.pathology.embeddings import Cancelled
from meddx.serving.jobs import Job, JobQueue, QueueFullError


def _wait(job: Job, status: str, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while job.status != status:
        assert time.time() < deadline, f"job stayed {job.status}, wanted {status}"
        time.sleep(0.01)


def _slide(folder: Path) -> Path:
    p = folder / "slide.tiff"
    p.write_bytes(b"x")
    return p


def test_queue_runs_jobs_refuses_past_its_size_and_cancels(tmp_path) -> None:
    gate = threading.Event()

    def run(job: Job) -> dict:
        job.progress(0, 10)
        while not gate.is_set():
            if job.cancel.is_set():
                raise Cancelled("cancelled")
            time.sleep(0.01)
        job.progress(10, 10)
        return {"ok": job.id}

    q = JobQueue(tmp_path / "jobs", workers=1, max_queued=2, run=run)
    try:
        jobs = []
        for _ in range(3):  # one runs, two wait
            folder = q.new_folder()
            jobs.append(q.submit("m", "me", folder, _slide(folder), owned_slide=True))
            if len(jobs) == 1:
                _wait(jobs[0], "running")
        assert (tmp_path / "jobs").stat().st_mode & 0o777 == 0o700
        with pytest.raises(QueueFullError) as e:
            folder = q.new_folder()
            q.submit("m", "me", folder, _slide(folder), owned_slide=True)
        assert e.value.status_code == 429
        running, waiting, last = jobs
        assert running.describe()["tiles_total"] == 10
        q.cancel(waiting)  # a queued job never starts
        assert waiting.status == "cancelled" and not waiting.slide.exists()
        q.cancel(running)  # a running one stops at its next check
        _wait(running, "cancelled")
        assert not running.slide.exists()  # the upload never outlives its job
        gate.set()
        _wait(last, "succeeded")
        assert last.describe()["result"] == {"ok": last.id}
        assert last.describe()["progress"] == 1.0
        with pytest.raises(Exception, match="no job"):
            q.get(last.id, owner="someone else")
        q.delete(last)
        assert not last.folder.exists()
    finally:
        q.close()


def test_a_failing_job_reports_its_reason_and_the_worker_lives_on(tmp_path) -> None:
    def run(job: Job) -> dict:
        if job.model == "bad":
            raise DataError("the slide cannot be read")
        if job.model == "crash":
            raise RuntimeError("boom")
        return {"fine": True}

    q = JobQueue(tmp_path, workers=1, max_queued=4, run=run)
    try:
        folders = [q.new_folder() for _ in range(3)]
        bad, crash, good = (q.submit(m, "me", f, _slide(f), owned_slide=False)
                            for m, f in zip(("bad", "crash", "good"), folders, strict=True))
        _wait(good, "succeeded")
        assert bad.status == "failed" and bad.error["status"] == 422
        assert "cannot be read" in bad.error["message"]
        assert crash.status == "failed" and crash.error["message"].startswith("internal")
        assert "boom" not in str(crash.describe())
        assert bad.slide.exists()  # a server-side slide is never deleted
    finally:
        q.close()
