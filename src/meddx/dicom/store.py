"""The listener's and the pipeline's state: SQLite in the work folder.

Every received instance is a row from the moment it is on disk until it ends as *analysed*
(a result was queued for the destination) or *failed* (with its reason); nothing is kept only
in memory, so a process killed half-way through a study finishes it after a restart.

Studies are named in logs by :meth:`Store.study_key`, a salted hash of the Study Instance UID
(the salt lives in the work folder, or ``MEDDX_DICOM_SALT``), never by a patient identifier.

Tables: ``instances`` (one row per SOP Instance UID: the idempotency key), ``studies``
(last arrival, state), ``analyses`` (one model's answer on one series, with the result SOP
Instance UIDs queued), ``failures`` (instance, reason, detail).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Store", "InstanceRow", "FAILURE_REASONS"]

# the reasons an instance can end in the failure list (issue 21, point 5)
FAILURE_REASONS = ("unsupported-sop-class", "decode-failure", "no-matching-model", "ood",
                   "destination-refused", "too-large", "too-many-instances", "model-error")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, series_uid TEXT NOT NULL,
    sop_class TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL,
    calling_ae TEXT NOT NULL, received REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'received',   -- received | analysed | failed
    duplicates INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid, state);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY, study_key TEXT NOT NULL, last_received REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'receiving');  -- receiving | done
CREATE TABLE IF NOT EXISTS analyses (
    analysis_key TEXT PRIMARY KEY, study_uid TEXT NOT NULL, series_uid TEXT NOT NULL,
    model TEXT NOT NULL, prediction TEXT NOT NULL, result_uids TEXT NOT NULL,
    state TEXT NOT NULL, created REAL NOT NULL);   -- computed | queued
CREATE TABLE IF NOT EXISTS failures (
    id INTEGER PRIMARY KEY AUTOINCREMENT, sop_uid TEXT, study_uid TEXT, series_uid TEXT,
    reason TEXT NOT NULL, detail TEXT NOT NULL, at REAL NOT NULL);
"""


@dataclass(frozen=True)
class InstanceRow:
    """One received instance as the store knows it."""

    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class: str
    path: Path
    size: int
    calling_ae: str
    received: float
    state: str


class Store:
    """SQLite state of one work folder (thread-safe: one connection per call, WAL journal).

    Args:
        work: the work folder; the database is ``work/state.sqlite``.
        salt: secret for study keys (default: ``MEDDX_DICOM_SALT`` or ``work/salt``, created
            on first use with mode 0600).
    """

    def __init__(self, work: str | Path, salt: str | None = None) -> None:
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.path = self.work / "state.sqlite"
        self._salt = salt or os.environ.get("MEDDX_DICOM_SALT") or self._read_salt()
        self._lock = threading.Lock()
        with self._connect() as db:
            db.executescript(_SCHEMA)

    def _read_salt(self) -> str:
        path = self.work / "salt"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(16))
        return path.read_text().strip()

    @property
    def salt(self) -> str:
        """The secret salt (for study keys and de-identification)."""
        return self._salt

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.row_factory = sqlite3.Row
            yield db
        finally:
            db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def study_key(self, study_uid: str) -> str:
        """The salted hash that names a study in logs, the audit and the worklist."""
        return hashlib.sha256(f"{self._salt}\x00{study_uid}".encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ receive
    def count_instances(self, study_uid: str) -> int:
        """How many distinct instances of a study were received."""
        with self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM instances WHERE study_uid=?",
                                  (study_uid,)).fetchone()[0])

    def add_instance(self, *, sop_uid: str, study_uid: str, series_uid: str, sop_class: str,
                     path: Path, size: int, calling_ae: str, now: float | None = None) -> bool:
        """Record a received instance; False when the SOP Instance UID is already known (a
        duplicate: counted, not analysed again)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute("SELECT sop_uid FROM instances WHERE sop_uid=?", (sop_uid,)).fetchone()
            if row is not None:
                db.execute("UPDATE instances SET duplicates=duplicates+1 WHERE sop_uid=?",
                           (sop_uid,))
                return False
            db.execute("INSERT INTO instances (sop_uid, study_uid, series_uid, sop_class, path,"
                       " size, calling_ae, received) VALUES (?,?,?,?,?,?,?,?)",
                       (sop_uid, study_uid, series_uid, sop_class, str(path), size, calling_ae,
                        now))
            db.execute("INSERT INTO studies (study_uid, study_key, last_received) VALUES (?,?,?)"
                       " ON CONFLICT(study_uid) DO UPDATE SET last_received=excluded."
                       "last_received, state='receiving'",
                       (study_uid, self.study_key(study_uid), now))
        return True

    def has_instance(self, sop_uid: str) -> bool:
        """Whether this SOP Instance UID was received before."""
        with self._connect() as db:
            return db.execute("SELECT 1 FROM instances WHERE sop_uid=?",
                              (sop_uid,)).fetchone() is not None

    def is_result(self, sop_uid: str) -> bool:
        """Whether this SOP Instance UID is one of meddx's own results (never fetched back)."""
        with self._connect() as db:
            return db.execute("SELECT 1 FROM analyses WHERE instr(result_uids, ?) > 0",
                              (f'"{sop_uid}"',)).fetchone() is not None

    def complete_studies(self, quiet: float, now: float | None = None) -> list[str]:
        """Studies with unfinished instances and nothing received for ``quiet`` seconds
        (after a restart this includes every study left half-processed)."""
        now = time.time() if now is None else now
        with self._connect() as db:
            rows = db.execute(
                "SELECT s.study_uid FROM studies s WHERE s.last_received <= ? AND EXISTS "
                "(SELECT 1 FROM instances i WHERE i.study_uid=s.study_uid AND "
                "i.state='received') ORDER BY s.last_received", (now - quiet,)).fetchall()
        return [r[0] for r in rows]

    def pending_instances(self, study_uid: str) -> list[InstanceRow]:
        """The study's instances not yet analysed or failed."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM instances WHERE study_uid=? AND state='received'"
                              " ORDER BY series_uid, sop_uid", (study_uid,)).fetchall()
        return [_row(r) for r in rows]

    def series_instances(self, series_uid: str) -> list[InstanceRow]:
        """Every instance of a series (a volume model analyses the whole series)."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM instances WHERE series_uid=? ORDER BY sop_uid",
                              (series_uid,)).fetchall()
        return [_row(r) for r in rows]

    # ------------------------------------------------------------------ outcomes
    def fail(self, sop_uids: list[str], reason: str, detail: str, *, study_uid: str | None = None,
             series_uid: str | None = None) -> None:
        """Put instances in the failure list with their reason (``FAILURE_REASONS``)."""
        if reason not in FAILURE_REASONS:
            raise ValueError(f"unknown failure reason {reason!r}")
        now = time.time()
        with self._tx() as db:
            for uid in sop_uids or [None]:
                db.execute("INSERT INTO failures (sop_uid, study_uid, series_uid, reason, detail,"
                           " at) VALUES (?,?,?,?,?,?)",
                           (uid, study_uid, series_uid, reason, detail[:500], now))
                if uid is not None:
                    db.execute("UPDATE instances SET state='failed' WHERE sop_uid=? AND "
                               "state='received'", (uid,))

    def analysis(self, analysis_key: str) -> dict[str, Any] | None:
        """A stored analysis by its key (None: not made yet)."""
        with self._connect() as db:
            row = db.execute("SELECT * FROM analyses WHERE analysis_key=?",
                             (analysis_key,)).fetchone()
        return None if row is None else _analysis(row)

    def save_analysis(self, *, analysis_key: str, study_uid: str, series_uid: str, model: str,
                      prediction: dict[str, Any], result_uids: list[str]) -> None:
        """Record one model's answer on a series before its results are queued."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO analyses (analysis_key, study_uid, series_uid, model,"
                       " prediction, result_uids, state, created) VALUES (?,?,?,?,?,?,?,?)",
                       (analysis_key, study_uid, series_uid, model, json.dumps(prediction),
                        json.dumps(result_uids), "computed", time.time()))

    def mark_queued(self, analysis_key: str, sop_uids: list[str]) -> None:
        """The analysis's results are in the Outbox: its source instances are analysed."""
        with self._tx() as db:
            db.execute("UPDATE analyses SET state='queued' WHERE analysis_key=?", (analysis_key,))
            db.executemany("UPDATE instances SET state='analysed' WHERE sop_uid=? AND "
                           "state='received'", [(u,) for u in sop_uids])

    def mark_analysed(self, sop_uids: list[str]) -> None:
        """Instances covered by a queued analysis (e.g. of another model) are done."""
        with self._tx() as db:
            db.executemany("UPDATE instances SET state='analysed' WHERE sop_uid=? AND "
                           "state='received'", [(u,) for u in sop_uids])

    def finish_study(self, study_uid: str) -> None:
        """Mark a study done when none of its instances is still pending."""
        with self._tx() as db:
            db.execute("UPDATE studies SET state='done' WHERE study_uid=? AND NOT EXISTS (SELECT"
                       " 1 FROM instances WHERE study_uid=? AND state='received')",
                       (study_uid, study_uid))

    # ------------------------------------------------------------------ reading
    def analyses(self) -> list[dict[str, Any]]:
        """Every analysis (newest first)."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM analyses ORDER BY created DESC").fetchall()
        return [_analysis(r) for r in rows]

    def failures(self) -> list[dict[str, Any]]:
        """The failure list: instance, study key (never the UID), reason, detail."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM failures ORDER BY id").fetchall()
        return [{"sop_uid": r["sop_uid"], "study": self.study_key(r["study_uid"])
                 if r["study_uid"] else None, "series_uid": r["series_uid"],
                 "reason": r["reason"], "detail": r["detail"], "at": r["at"]} for r in rows]

    def counts(self) -> dict[str, int]:
        """Instances by state, duplicates received, studies, analyses, failures."""
        with self._connect() as db:
            by_state = dict(db.execute("SELECT state, COUNT(*) FROM instances GROUP BY state")
                            .fetchall())
            dup = db.execute("SELECT COALESCE(SUM(duplicates),0) FROM instances").fetchone()[0]
            studies = db.execute("SELECT COUNT(*) FROM studies").fetchone()[0]
            analyses = db.execute("SELECT COUNT(*) FROM analyses").fetchone()[0]
            failures = db.execute("SELECT COUNT(*) FROM failures").fetchone()[0]
        return {"received": sum(by_state.values()), "analysed": by_state.get("analysed", 0),
                "failed": by_state.get("failed", 0), "pending": by_state.get("received", 0),
                "duplicates": int(dup), "studies": int(studies), "analyses": int(analyses),
                "failures": int(failures)}


def _row(r: sqlite3.Row) -> InstanceRow:
    return InstanceRow(sop_uid=r["sop_uid"], study_uid=r["study_uid"], series_uid=r["series_uid"],
                       sop_class=r["sop_class"], path=Path(r["path"]), size=r["size"],
                       calling_ae=r["calling_ae"], received=r["received"], state=r["state"])


def _analysis(r: sqlite3.Row) -> dict[str, Any]:
    return {"analysis_key": r["analysis_key"], "study_uid": r["study_uid"],
            "series_uid": r["series_uid"], "model": r["model"],
            "prediction": json.loads(r["prediction"]), "result_uids": json.loads(r["result_uids"]),
            "state": r["state"], "created": r["created"]}
