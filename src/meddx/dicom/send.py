"""Results back to the PACS, with nothing lost: a persistent outbox with retries.

:class:`Outbox` keeps every result object in SQLite (the row) and on disk (the file, written
before the row), and :meth:`Outbox.deliver` sends the items that are due by C-STORE (pynetdicom)
or STOW-RS (dicomweb-client). A failed try is recorded and the item waits, with exponential
back-off, for the next ``deliver()``; after ``max_attempts`` tries or ``max_age_s`` seconds it is
marked ``failed`` with its reason and listed by :meth:`Outbox.failed` — never deleted.
A destination's refusal that retrying cannot change (unknown SOP class, data set the
destination cannot understand) fails the item at once, with the status in the reason.

Exactly once: an item is marked sent right after the destination confirms it, the same SOP
Instance UID is queued once per destination, and the results' UIDs are derived from the
analysis (:func:`meddx.dicom.results.derived_uid`): should the process die between the
destination's answer and the row's update, the resend carries the same UIDs and the PACS keeps
one copy.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydicom
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydicom.dataset import Dataset

from meddx.errors import ConfigError, DataError

__all__ = ["Destination", "Outbox", "OutboxItem", "DeliveryReport", "SendError",
           "PERMANENT_STATUSES"]

logger = logging.getLogger(__name__)

# C-STORE statuses a retry cannot change: refused SOP class, data set does not match the SOP
# class, cannot understand (PS3.4 B.2.3 and PS3.7 C)
PERMANENT_STATUSES = {0x0122, 0x0124, 0xA900} | set(range(0xC000, 0xD000))
STATE_PENDING, STATE_SENT, STATE_FAILED = "pending", "sent", "failed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    next_attempt REAL NOT NULL,
    sent_at REAL,
    last_error TEXT,
    UNIQUE (sop_instance_uid, destination)
)
"""


class SendError(DataError):
    """A destination refused or could not be reached (kept in the outbox's failure list)."""


class Destination(BaseModel):
    """Where results go: a DICOM node (C-STORE) or a DICOMweb server (STOW-RS).

    Credentials are never literal: name a file (``credentials_file``) or an environment
    variable (``credentials_env``) holding a bearer token, or ``user:password`` for basic.

    Attributes:
        name: a short name for logs and the failure list.
        kind: ``dimse`` (needs host, port, ae_title) or ``dicomweb`` (needs url).
        calling_ae_title: meddx's own AE title towards a DIMSE destination.
        timeout_s: connection and response timeout.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "pacs"
    kind: Literal["dimse", "dicomweb"]
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    ae_title: str | None = Field(default=None, min_length=1, max_length=16)
    calling_ae_title: str = Field(default="MEDDX", min_length=1, max_length=16)
    url: str | None = None
    auth: Literal["none", "bearer", "basic"] = "none"
    credentials_file: Path | None = None
    credentials_env: str | None = None
    timeout_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _complete(self) -> Destination:
        if self.kind == "dimse" and (not self.host or self.port is None or not self.ae_title):
            raise ValueError("a dimse destination needs host, port and ae_title")
        if self.kind == "dicomweb" and not (self.url and self.url.startswith(("http://",
                                                                             "https://"))):
            raise ValueError("a dicomweb destination needs an http(s) url")
        sources = (self.credentials_file is not None) + (self.credentials_env is not None)
        if self.auth != "none" and sources != 1:
            raise ValueError(f"auth '{self.auth}' needs exactly one of credentials_file or "
                             "credentials_env")
        return self

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Destination:
        """Validate a dict (a config file's ``destination:``) with readable errors."""
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            problems = [("unknown key '" + ".".join(map(str, err["loc"])) + "'")
                        if err["type"] == "extra_forbidden" else err["msg"]
                        for err in e.errors()]
            raise ConfigError("invalid destination: " + "; ".join(problems),
                              hint="kind: dimse with host/port/ae_title, or kind: dicomweb "
                              "with url; credentials only by credentials_file or "
                              "credentials_env") from e

    @property
    def key(self) -> str:
        """The destination as stored with each outbox row."""
        return self.model_dump_json()

    def secret(self) -> str | None:
        """The credential (token or ``user:password``), read now from its file or variable."""
        if self.auth == "none":
            return None
        if self.credentials_file is not None:
            try:
                value = self.credentials_file.read_text(encoding="utf-8").strip()
            except OSError as e:
                raise ConfigError(f"credentials file of destination {self.name!r} cannot be "
                                  "read", path=str(self.credentials_file),
                                  hint="check the path and its permissions") from e
        else:
            value = os.environ.get(str(self.credentials_env), "").strip()
        if not value:
            raise ConfigError(f"credentials of destination {self.name!r} are empty",
                              hint="put the token (or user:password) in the named file or "
                              "environment variable")
        if self.auth == "basic" and ":" not in value:
            raise ConfigError("basic credentials must read user:password",
                              hint="write user:password in the credentials file")
        return value


@dataclass(frozen=True)
class OutboxItem:
    """One queued result object."""

    id: int
    sop_instance_uid: str
    sop_class_uid: str
    destination: str
    path: Path
    state: str
    attempts: int
    created: float
    next_attempt: float
    sent_at: float | None
    last_error: str | None


@dataclass
class DeliveryReport:
    """What one :meth:`Outbox.deliver` did (item ids)."""

    sent: list[int] = field(default_factory=list)
    deferred: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def attempted(self) -> int:
        return len(self.sent) + len(self.deferred) + len(self.failed)


class Outbox:
    """A persistent queue of result objects per destination (SQLite + files).

    Args:
        db_path: the SQLite file (created); the objects go to ``<db_path>.files/``.
        max_attempts: tries before an item is ``failed``.
        max_age_s: age after which an item that still fails is ``failed``.
        base_delay_s: wait after the first failed try; doubled after each further one.
        max_delay_s: the longest wait between tries.
    """

    def __init__(self, db_path: str | Path, *, max_attempts: int = 10,
                 max_age_s: float = 7 * 24 * 3600, base_delay_s: float = 5.0,
                 max_delay_s: float = 1800.0) -> None:
        if max_attempts < 1 or base_delay_s <= 0 or max_delay_s < base_delay_s:
            raise ConfigError("outbox needs max_attempts ≥ 1 and 0 < base_delay_s ≤ max_delay_s")
        self.db_path = Path(db_path)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self.files = self.db_path.with_name(self.db_path.name + ".files")
        self.files.mkdir(exist_ok=True)
        self.max_attempts, self.max_age_s = max_attempts, max_age_s
        self.base_delay_s, self.max_delay_s = base_delay_s, max_delay_s
        self._lock = threading.Lock()
        self._delivering = threading.Lock()  # one deliver() at a time: no item sent twice
        self._db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def enqueue(self, datasets: Iterable[Dataset], destination: Destination,
                now: float | None = None) -> list[int]:
        """Queue result objects for ``destination``: each written to disk, then recorded.

        The same SOP Instance UID queued again for the same destination is not queued twice:
        its existing id is returned.

        Raises:
            DataError: a dataset has no SOP Class/Instance UID.
        """
        now = time.time() if now is None else now
        ids = []
        for ds in datasets:
            sop_uid, sop_class = ds.get("SOPInstanceUID"), ds.get("SOPClassUID")
            if not sop_uid or not sop_class:
                raise DataError("a result object without SOP Instance/Class UID cannot be sent",
                                hint="build results with meddx.dicom.results")
            path = self.files / f"{sop_uid}.dcm"
            with self._lock:
                row = self._db.execute(
                    "SELECT id FROM outbox WHERE sop_instance_uid=? AND destination=?",
                    (str(sop_uid), destination.key)).fetchone()
                if row is not None:
                    ids.append(int(row[0]))
                    continue
                ds.save_as(path, enforce_file_format=True)
                cur = self._db.execute(
                    "INSERT INTO outbox (sop_instance_uid, sop_class_uid, destination, path, "
                    "created, next_attempt) VALUES (?, ?, ?, ?, ?, ?)",
                    (str(sop_uid), str(sop_class), destination.key, str(path), now, now))
                ids.append(int(cur.lastrowid or 0))
        logger.info("queued %d object(s) for destination %s", len(ids), destination.name)
        return ids

    def _items(self, where: str, args: Sequence[Any] = ()) -> list[OutboxItem]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, sop_instance_uid, sop_class_uid, destination, path, state, attempts,"
                " created, next_attempt, sent_at, last_error FROM outbox WHERE " + where +
                " ORDER BY id", args).fetchall()
        return [OutboxItem(r[0], r[1], r[2], json.loads(r[3])["name"], Path(r[4]), *r[5:])
                for r in rows]

    def pending(self) -> list[OutboxItem]:
        """Items still to be delivered (including those waiting for their next try)."""
        return self._items("state=?", (STATE_PENDING,))

    def failed(self) -> list[OutboxItem]:
        """Items given up on, each with its reason (kept, never deleted)."""
        return self._items("state=?", (STATE_FAILED,))

    def sent(self) -> list[OutboxItem]:
        return self._items("state=?", (STATE_SENT,))

    def item(self, item_id: int) -> OutboxItem:
        found = self._items("id=?", (item_id,))
        if not found:
            raise ConfigError(f"no outbox item {item_id}")
        return found[0]

    def retry(self, item_ids: Iterable[int], now: float | None = None) -> None:
        """Put failed items back in the queue (an operator's decision), attempts reset."""
        now = time.time() if now is None else now
        with self._lock:
            for i in item_ids:
                self._db.execute("UPDATE outbox SET state=?, attempts=0, created=?, "
                                 "next_attempt=? WHERE id=? AND state=?",
                                 (STATE_PENDING, now, now, int(i), STATE_FAILED))

    def deliver(self, now: float | None = None) -> DeliveryReport:
        """Send every item that is due, one connection per destination.

        Args:
            now: the clock (seconds since the epoch; tests move it forward).

        Returns:
            which items were sent, deferred to a later try, or failed for good.
        """
        with self._delivering:
            return self._deliver(time.time() if now is None else now)

    def _deliver(self, now: float) -> DeliveryReport:
        due = self._items("state=? AND next_attempt<=?", (STATE_PENDING, now))
        report = DeliveryReport()
        by_dest: dict[str, list[OutboxItem]] = {}
        for item in due:
            by_dest.setdefault(self._dest_key(item.id), []).append(item)
        for key, items in by_dest.items():
            dest = Destination.model_validate_json(key)
            try:
                results = _SENDERS[dest.kind](dest, items)
            except (SendError, ConfigError) as e:  # the whole destination: unreachable etc.
                report.errors[dest.name] = str(e)
                results = {item.id: (False, str(e)) for item in items}
            for item in items:
                ok, reason = results.get(item.id, (False, "no answer for this object"))
                self._record(item, ok, reason, now, report)
        if report.attempted:
            logger.info("delivery: %d sent, %d deferred, %d failed", len(report.sent),
                        len(report.deferred), len(report.failed))
        return report

    def _dest_key(self, item_id: int) -> str:
        with self._lock:
            return str(self._db.execute("SELECT destination FROM outbox WHERE id=?",
                                        (item_id,)).fetchone()[0])

    def _record(self, item: OutboxItem, ok: bool, reason: str | None, now: float,
                report: DeliveryReport) -> None:
        attempts = item.attempts + 1
        if ok:
            state, nxt = STATE_SENT, item.next_attempt
            report.sent.append(item.id)
        else:
            permanent = reason is not None and reason.startswith("refused permanently")
            delay = min(self.max_delay_s, self.base_delay_s * 2 ** (attempts - 1))
            too_old = now - item.created >= self.max_age_s
            if permanent or attempts >= self.max_attempts or too_old:
                state, nxt = STATE_FAILED, item.next_attempt
                reason = f"{reason} (after {attempts} attempt(s))"
                report.failed.append(item.id)
                logger.warning("outbox item %d failed for good: %s", item.id, reason)
            else:
                state, nxt = STATE_PENDING, now + delay
                report.deferred.append(item.id)
        with self._lock:
            self._db.execute(
                "UPDATE outbox SET state=?, attempts=?, next_attempt=?, sent_at=?, last_error=?"
                " WHERE id=?", (state, attempts, nxt, now if ok else None,
                                None if ok else reason, item.id))


def _read(item: OutboxItem) -> Dataset:
    try:
        return pydicom.dcmread(item.path)
    except (OSError, pydicom.errors.InvalidDicomError) as e:
        raise SendError(f"queued file of item {item.id} cannot be read: {e}") from e


def _send_dimse(dest: Destination, items: list[OutboxItem]) -> dict[int, tuple[bool, str | None]]:
    """C-STORE every item over one association."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.presentation import build_context

    datasets = {}
    out: dict[int, tuple[bool, str | None]] = {}
    for item in items:
        try:
            datasets[item.id] = _read(item)
        except SendError as e:
            out[item.id] = (False, str(e))
    ae = AE(ae_title=dest.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout_s
    ae.connection_timeout = dest.timeout_s
    pairs = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
             for ds in datasets.values()}
    for sop_class, syntax in sorted(pairs)[:128]:
        ae.requested_contexts = [*ae.requested_contexts, build_context(
            sop_class, list(dict.fromkeys([syntax, ExplicitVRLittleEndian,
                                           ImplicitVRLittleEndian])))]
    assoc = ae.associate(str(dest.host), int(dest.port or 0), ae_title=str(dest.ae_title))
    if not assoc.is_established:
        raise SendError(f"destination {dest.name} ({dest.host}:{dest.port}) did not accept "
                        "an association (down, unreachable or rejected)")
    try:
        for item_id, ds in datasets.items():
            out[item_id] = _store_one(assoc, ds)
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def _store_one(assoc: Any, ds: Dataset) -> tuple[bool, str | None]:
    try:
        status = assoc.send_c_store(ds)
    except (ValueError, RuntimeError) as e:  # no accepted context for it, association lost
        return False, f"not sent: {e}"
    code = getattr(status, "Status", None)
    if code is None:
        return False, "no response from the destination (timeout or aborted association)"
    if code == 0x0000 or 0xB000 <= code <= 0xBFFF:
        return True, None
    prefix = "refused permanently" if code in PERMANENT_STATUSES else "refused"
    return False, f"{prefix}: C-STORE status 0x{code:04X}"


def _send_dicomweb(dest: Destination, items: list[OutboxItem]
                   ) -> dict[int, tuple[bool, str | None]]:
    """STOW-RS each item (one request each, so each object's outcome is known)."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    secret = dest.secret()
    if dest.auth == "bearer":
        session.headers["Authorization"] = f"Bearer {secret}"
    elif dest.auth == "basic" and secret:
        user, _, password = secret.partition(":")
        session.auth = (user, password)
    client = DICOMwebClient(str(dest.url), session=session, timeout=dest.timeout_s)
    client.set_http_retry_params(retry=False)  # the outbox retries, with its own back-off
    out: dict[int, tuple[bool, str | None]] = {}
    for item in items:
        try:
            ds = _read(item)
            answer = client.store_instances([ds])
        except SendError as e:
            out[item.id] = (False, str(e))
            continue
        except requests.ConnectionError as e:
            raise SendError(f"destination {dest.name} cannot be reached: "
                            f"{type(e).__name__}") from e
        except requests.HTTPError as e:
            code = e.response.status_code if e.response is not None else 0
            prefix = "refused permanently" if code in (400, 409, 415) else "refused"
            out[item.id] = (False, f"{prefix}: STOW-RS HTTP {code}")
            continue
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            reason = failed[0].get("FailureReason", "unknown")
            out[item.id] = (False, f"refused: STOW-RS failure reason {reason}")
        else:
            out[item.id] = (True, None)
    return out


_SENDERS = {"dimse": _send_dimse, "dicomweb": _send_dicomweb}
