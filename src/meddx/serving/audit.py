"""Append-only audit log: one JSON line per answered request, flushed before the answer leaves.

Each line names the time, the route, the caller (API key id, or JWT ``iss``/``sub``), the model
(name, version, weights sha256), the sha256 of every input and what was answered. It never holds
patient identifiers: no file names, no patient ids, no FHIR resource ids — only digests.
Lines are hash-chained (``prev`` and ``hash`` end each line; see
:mod:`meddx.serving.audit_chain`): ``meddx audit verify LOG`` names an edited, deleted or
reordered line, and a log whose last line does not verify is never extended.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meddx.serving.audit_chain import chain_line, last_hash

__all__ = ["AuditLog", "sha256_bytes", "default_audit_path"]

logger = logging.getLogger(__name__)


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of an input, the only way an input is named in the log."""
    return hashlib.sha256(data).hexdigest()


def default_audit_path() -> Path:
    """``$MEDDX_AUDIT_LOG`` or ``~/.cache/meddx/audit.jsonl``."""
    env = os.environ.get("MEDDX_AUDIT_LOG")
    return Path(env) if env else Path.home() / ".cache" / "meddx" / "audit.jsonl"


def _summary(output: Any) -> Any:
    """The parts of a prediction worth keeping (no explanation arrays, no ids)."""
    if hasattr(output, "to_dict"):
        output = output.to_dict()
    if not isinstance(output, dict):
        return output
    keep = ("label", "decision", "calibrated", "probabilities", "prediction_set", "refer",
            "review", "label_sets", "operating_point", "threshold")
    return {k: output[k] for k in keep if k in output and output[k] is not None}


class AuditLog:
    """Thread-safe JSON-lines writer opened in append mode.

    Args:
        path: the log file (its folder is created).
        fsync: also ``os.fsync`` every line (survives a power cut; costs a disk write per call).
    """

    def __init__(self, path: str | Path, fsync: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._prev = last_hash(self.path)  # refuses a log whose tail does not verify
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")

    def write(self, event: dict[str, Any]) -> None:
        """Append one event (``time`` added, then ``prev`` and ``hash`` of the chain) and
        flush it to the OS before returning."""
        if "prev" in event or "hash" in event:
            raise ValueError("'prev' and 'hash' are the audit chain's own fields")
        record = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), **event}
        body = json.dumps(record, default=str, separators=(",", ":"))
        with self._lock:  # the chain's order is the file's order
            line, self._prev = chain_line(body, self._prev)
            self._file.write(line)
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())

    def prediction(self, *, route: str, caller: dict[str, Any], model: dict[str, Any],
                   inputs: list[str], outputs: list[Any], status: int = 200,
                   request_id: str | None = None, extra: dict[str, Any] | None = None) -> None:
        """Record one answered prediction request.

        Args:
            route: the route template (``/v1/models/{name}/predict``), never the raw URL.
            caller: :meth:`meddx.serving.auth.Caller.audit`.
            model: ``{"name", "version", "sha256"}``.
            inputs: sha256 of each input.
            outputs: predictions (or dicts) per input; reduced to label/decision/probabilities.
            status: the HTTP status answered.
        """
        event = {"event": "predict", "route": route, "status": status, "caller": caller,
                 "model": {k: model.get(k) for k in ("name", "version", "sha256")},
                 "inputs": inputs, "outputs": [_summary(o) for o in outputs]}
        if request_id:
            event["request_id"] = request_id
        if extra:
            event.update(extra)
        self.write(event)

    def error(self, *, route: str, caller: dict[str, Any] | None, status: int, error: str,
              model: str | None = None, inputs: list[str] | None = None,
              request_id: str | None = None) -> None:
        """Record an accepted request that was answered with an error."""
        event = {"event": "error", "route": route, "status": status, "caller": caller,
                 "error": error, "model": model, "inputs": inputs or []}
        if request_id:
            event["request_id"] = request_id
        self.write(event)

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
