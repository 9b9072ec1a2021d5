"""Append-only audit log: one JSON line per answered request, flushed before the answer leaves.

Each line names the time, the route, the caller (API key id, or JWT ``iss``/``sub``), the model
(name, version, weights sha256), the sha256 of every input and what was answered. It never holds
patient identifiers: no file names, no patient ids, no FHIR resource ids — only digests.
Inside a request it also names the service's request id (``X-Request-ID``) and, per input, the
statistics of the model input tensor (``input_stats``) that ``meddx monitor`` compares with
the package's training reference.

The lines are hash-chained, so that an edited, deleted or reordered line is found
(:func:`verify_log`, ``meddx audit verify LOG``). Every line holds two added fields:

- ``prev``: the ``hash`` of the line before it (:data:`GENESIS`, 64 zeros, for the first line);
- ``hash``: the sha256 of the line's canonical JSON without ``hash`` (keys sorted, no spaces,
  ASCII), which is also exactly how the line is written, ``hash`` last.

Opening a log reads its last line to continue the chain. When that line cannot continue it
(not JSON, a torn write without its newline, no ``hash``, a ``hash`` that does not match its
content, e.g. a log from before chaining), the writer starts a new chain segment: its first line
has ``prev`` = :data:`GENESIS`, ``"chain": "restarted"`` and ``"chain_reason"``. The damaged line
stays as it is, so verification still names it. A hash chain makes tampering evident, not
impossible: whoever can rewrite the file can recompute every hash after an edit, and dropping the
last lines leaves a valid chain. Keep the ``head`` hash that ``meddx audit verify`` prints (or
ship lines off the host) to anchor it. One process writes one log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meddx.fhir.cds import sha256_bytes
from meddx.serving import context

__all__ = ["AuditLog", "sha256_bytes", "default_audit_path", "verify_log", "LogCheck",
           "GENESIS"]

logger = logging.getLogger(__name__)



def default_audit_path() -> Path:
    """``$MEDDX_AUDIT_LOG`` or ``~/.cache/meddx/audit.jsonl``."""
    env = os.environ.get("MEDDX_AUDIT_LOG")
    return Path(env) if env else Path.home() / ".cache" / "meddx" / "audit.jsonl"


GENESIS = "0" * 64


def _canonical(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)


def _seal(record: dict[str, Any]) -> tuple[str, str]:
    """The written line (canonical JSON, ``hash`` appended last) and its hash."""
    body = _canonical(record)
    digest = hashlib.sha256(body.encode("ascii")).hexdigest()
    return f'{body[:-1]},"hash":"{digest}"}}\n', digest


def _line_problem(text: str) -> tuple[dict[str, Any] | None, str | None]:
    """Parse one line; (record, None) when its hash matches its content, else (record?, why)."""
    try:
        record = json.loads(text)
    except ValueError:
        return None, "not JSON"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if not isinstance(record.get("hash"), str):
        return record, "no hash (written before chaining, or edited)"
    body = {k: v for k, v in record.items() if k != "hash"}
    if hashlib.sha256(_canonical(body).encode("ascii")).hexdigest() != record["hash"]:
        return record, "edited: its hash does not match its content"
    return record, None


def _tail(path: Path, chunk: int = 1 << 16) -> tuple[bytes, bool]:
    """The last line of a file (without its newline) and whether the file ends with one."""
    with path.open("rb") as f:
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            return b"", True
        f.seek(end - 1)
        newline = f.read(1) == b"\n"
        stop = end - 1 if newline else end
        data, pos = b"", stop
        while pos > 0 and b"\n" not in data:
            pos = max(0, pos - chunk)
            f.seek(pos)
            data = f.read(stop - pos)
        return data.rsplit(b"\n", 1)[-1], newline


def _summary(output: Any) -> Any:
    """The parts of a prediction worth keeping (no explanation arrays, no ids)."""
    if hasattr(output, "to_dict"):
        output = output.to_dict()
    if not isinstance(output, dict):
        return output
    keep = ("label", "decision", "calibrated", "probabilities", "prediction_set", "refer",
            "review", "label_sets", "operating_point", "threshold", "ood")
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
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._prev, self._restart = GENESIS, None
        last, newline = _tail(self.path)
        if last:
            record, why = _line_problem(last.decode("utf-8", "replace"))
            if not newline:
                why = "the last line was cut off (no newline)"
                self._file.write("\n")  # never glue a line onto a torn one
            if why is None and record is not None:
                self._prev = record["hash"]
            else:
                self._restart = f"last line of the log cannot continue the chain: {why}"
                logger.warning("audit log %s: %s; starting a new chain segment", self.path,
                               self._restart)

    @property
    def head(self) -> str:
        """The hash of the last line written (:data:`GENESIS` for an empty log)."""
        return self._prev

    def write(self, event: dict[str, Any]) -> None:
        """Append one event (``time``, ``prev``, ``hash`` added) and flush it before returning."""
        record = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), **event}
        with self._lock:
            record["prev"] = self._prev
            if self._restart:
                record["chain"], record["chain_reason"] = "restarted", self._restart
            line, self._prev = _seal(record)
            self._restart = None
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
        ctx = context.current()
        if ctx is not None:
            request_id = request_id or ctx.request_id
            if any(ctx.input_stats) and len(ctx.input_stats) == len(outputs):
                event["input_stats"] = ctx.input_stats
            context.note_outputs(model.get("name"), outputs)
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
        ctx = context.current()
        if ctx is not None:
            request_id = request_id or ctx.request_id
            context.note_error(error)
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


@dataclass
class LogCheck:
    """What :func:`verify_log` found.

    Attributes:
        lines: lines read (blank trailing line excluded).
        bad_line: 1-based number of the first line that breaks the chain (None: intact).
        reason: why that line is bad.
        head: hash of the last good line (keep it to anchor the log).
        restarts: ``(line, reason)`` of every chain segment started by the writer.
        unchained: leading lines written before chaining existed (not covered).
    """

    lines: int = 0
    bad_line: int | None = None
    reason: str | None = None
    head: str = GENESIS
    restarts: list[tuple[int, str]] = field(default_factory=list)
    unchained: int = 0

    @property
    def ok(self) -> bool:
        return self.bad_line is None


def verify_log(path: str | Path) -> LogCheck:
    """Walk the chain of an audit log and name the first line that breaks it.

    A line is bad when it is not JSON (``not JSON``), when its ``hash`` does not match its
    content (``edited``), or when its ``prev`` is not the ``hash`` of the line before (``a line
    was deleted or lines were reordered``). Lines before the first chained line that have no
    ``hash`` at all are counted as ``unchained`` (a log begun before chaining), not as bad.

    Raises:
        ConfigError: the log cannot be read.
    """
    from meddx.errors import ConfigError

    p = Path(path)
    check = LogCheck()
    prev: str | None = None  # None: no chained line seen yet
    try:
        f = p.open("r", encoding="utf-8", errors="replace")
    except OSError as e:
        raise ConfigError("cannot read the audit log", path=str(p)) from e
    with f:
        for number, text in enumerate(f, start=1):
            check.lines = number
            text = text.rstrip("\n")
            record, why = _line_problem(text)
            if why is None and record is not None:
                if record.get("chain") == "restarted":
                    if record.get("prev") != GENESIS:
                        why = "a restarted chain segment must begin at the genesis hash"
                    else:
                        check.restarts.append((number, str(record.get("chain_reason", ""))))
                elif prev is None and record.get("prev") != GENESIS:
                    why = ("prev is not the genesis hash: the first line is missing, or lines "
                           "were reordered")
                elif prev is not None and record.get("prev") != prev:
                    why = (f"prev does not match the hash of line {number - 1}: a line was "
                           "deleted or lines were reordered")
            elif prev is None and record is not None and "hash" not in record \
                    and "prev" not in record:
                check.unchained += 1
                continue
            if why is not None:
                check.bad_line, check.reason = number, why
                return check
            prev = check.head = record["hash"]
    return check
