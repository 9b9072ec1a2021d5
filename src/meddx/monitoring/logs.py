"""Reading what a running service leaves behind: the audit log, CDS feedback, outcomes.

Readers never stop at a bad line: a line that is not JSON, not an object, has no parseable
time or lacks what its event needs is counted under a reason (with the first line numbers)
and skipped.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meddx.errors import DataError

__all__ = ["Answered", "Failed", "Feedback", "Skipped", "AuditData", "read_audit",
           "read_feedback", "read_outcomes", "parse_time"]

logger = logging.getLogger(__name__)

_FIRST_LINES = 5


@dataclass
class Skipped:
    """Lines left out, by reason, with the first few line numbers of each."""

    counts: Counter = field(default_factory=Counter)
    lines: dict[str, list[int]] = field(default_factory=dict)

    def add(self, reason: str, lineno: int) -> None:
        self.counts[reason] += 1
        first = self.lines.setdefault(reason, [])
        if len(first) < _FIRST_LINES:
            first.append(lineno)

    @property
    def total(self) -> int:
        return int(sum(self.counts.values()))

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "by_reason": dict(self.counts),
                "first_lines": dict(self.lines)}


@dataclass
class Answered:
    """One answered input (a predict line holds one per input)."""

    time: datetime
    model: str
    sha256: str | None
    version: str | None
    route: str
    request_id: str | None
    index: int
    output: dict[str, Any]
    stats: dict[str, float] | None
    cds: bool  # answered a CDS Hooks call
    cards: int  # cards issued by that call (0 elsewhere); counted on the request's first input


@dataclass
class Failed:
    """A request answered with an error (or a CDS call that failed safe)."""

    time: datetime
    model: str | None
    route: str
    error: str
    status: int | None


@dataclass
class Feedback:
    """One CDS Hooks feedback entry."""

    time: datetime
    service: str
    outcome: str
    override_reason: str | None


@dataclass
class AuditData:
    answered: list[Answered] = field(default_factory=list)
    failed: list[Failed] = field(default_factory=list)
    skipped: Skipped = field(default_factory=Skipped)
    lines: int = 0
    other_events: int = 0


def _open(path: Path, what: str, encoding: str = "utf-8", newline: str | None = None) -> Any:
    """An opened text file (undecodable bytes replaced), or a DataError naming it."""
    try:
        return path.open("r", encoding=encoding, errors="replace", newline=newline)
    except OSError as e:
        raise DataError(f"cannot read the {what}", path=str(path)) from e


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 time (naive times are taken as UTC); None when it is not one."""
    if not isinstance(value, str):
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _stats(value: Any) -> dict[str, float] | None:
    if not isinstance(value, dict):
        return None
    try:
        return {str(k): float(v) for k, v in value.items()}
    except (TypeError, ValueError):
        return None


def _predict(rec: dict[str, Any], t: datetime) -> list[Answered] | str:
    model = rec.get("model")
    outputs = rec.get("outputs")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        return "predict line without a model name"
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        return "predict line without a list of outputs"
    stats = rec.get("input_stats")
    if not isinstance(stats, list) or len(stats) != len(outputs):
        stats = [None] * len(outputs)
    route = str(rec.get("route", ""))
    cards = rec.get("cards")
    n_cards = len(cards) if isinstance(cards, list) else 0
    rid = rec.get("request_id")
    return [Answered(time=t, model=model["name"], sha256=model.get("sha256"),
                     version=model.get("version"), route=route,
                     request_id=rid if isinstance(rid, str) else None, index=i, output=o,
                     stats=_stats(s), cds=route.startswith("/cds-services"),
                     cards=n_cards if i == 0 else 0)
            for i, (o, s) in enumerate(zip(outputs, stats, strict=True))]


def read_audit(path: str | Path) -> AuditData:
    """Every predict and error event of an audit log; bad lines counted, never fatal.

    Raises:
        DataError: the file cannot be opened.
    """
    out = AuditData()
    with _open(Path(path), "audit log") as f:
        for lineno, line in enumerate(f, start=1):
            out.lines += 1
            if not line.strip():
                out.skipped.add("empty line", lineno)
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                out.skipped.add("not JSON", lineno)
                continue
            if not isinstance(rec, dict):
                out.skipped.add("not a JSON object", lineno)
                continue
            t = parse_time(rec.get("time"))
            if t is None:
                out.skipped.add("no valid time", lineno)
                continue
            event = rec.get("event")
            if event == "predict":
                got = _predict(rec, t)
                if isinstance(got, str):
                    out.skipped.add(got, lineno)
                else:
                    out.answered.extend(got)
            elif event == "error":
                model = rec.get("model")
                status = rec.get("status")
                out.failed.append(Failed(
                    time=t, model=model if isinstance(model, str) else None,
                    route=str(rec.get("route", "")), error=str(rec.get("error", "unknown")),
                    status=status if isinstance(status, int) else None))
            else:
                out.other_events += 1
    out.answered.sort(key=lambda a: (a.time, a.index))
    return out


def read_feedback(path: str | Path) -> tuple[list[Feedback], Skipped]:
    """CDS Hooks feedback lines as :class:`~meddx.serving.cds.FeedbackStore` writes them."""
    entries: list[Feedback] = []
    skipped = Skipped()
    with _open(Path(path), "CDS feedback log") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                rec = json.loads(line)
            except ValueError:
                skipped.add("not JSON", lineno)
                continue
            if not isinstance(rec, dict):
                skipped.add("not a JSON object", lineno)
                continue
            t = parse_time(rec.get("time"))
            if t is None or rec.get("outcome") not in ("accepted", "overridden") \
                    or not isinstance(rec.get("service"), str):
                skipped.add("not a feedback entry (time, service, outcome)", lineno)
                continue
            reason = rec.get("overrideReason")
            code = reason.get("code") if isinstance(reason, dict) else None
            entries.append(Feedback(time=t, service=rec["service"], outcome=rec["outcome"],
                                    override_reason=str(code) if code else None))
    return entries, skipped


def read_outcomes(path: str | Path) -> tuple[list[tuple[str, int | None, str]], Skipped]:
    """``(request_id, input index or None, outcome text)`` per row of an outcomes CSV.

    The CSV has a header with ``request_id`` and ``outcome`` and optionally ``input`` (the
    input's position in a batch request, from 0).

    Raises:
        DataError: unreadable file, or a header without ``request_id`` and ``outcome``.
    """
    p = Path(path)
    rows: list[tuple[str, int | None, str]] = []
    skipped = Skipped()
    with _open(p, "outcomes CSV", encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        fields = {c.strip().lower() for c in reader.fieldnames or []}
        if not {"request_id", "outcome"} <= fields:
            raise DataError("the outcomes CSV needs the columns request_id and outcome",
                            path=str(p), hint="header: request_id,outcome[,input]")
        for lineno, raw in enumerate(reader, start=2):
            row = {str(k).strip().lower(): (v or "").strip() for k, v in raw.items() if k}
            rid, outcome, index = row.get("request_id"), row.get("outcome"), row.get("input")
            if not rid or not outcome:
                skipped.add("empty request_id or outcome", lineno)
                continue
            if index:
                if not index.isdigit():
                    skipped.add("input is not a non-negative integer", lineno)
                    continue
                rows.append((rid, int(index), outcome))
            else:
                rows.append((rid, None, outcome))
    return rows, skipped
