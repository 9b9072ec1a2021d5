"""The hash chain that makes the audit log tamper-evident.

Every line the service writes ends with two fields added to the event::

    {…event…,"prev":"<hash of the line before>","hash":"<sha256 of this line's content>"}

A line's content is its own text with the trailing ``,"hash":"…"`` removed (compact JSON, as
written; the first line of a log has ``prev`` = 64 zeros). So an edited line no longer matches
its ``hash``, and a deleted, inserted or reordered line breaks the next line's ``prev``.
:func:`verify_log` (``meddx audit verify LOG``) walks the file and names the first line that
breaks either rule.

A hash chain cannot show that lines were cut from the end of the log: keep the last hash
``meddx audit verify`` prints somewhere else (a ticket, another host) and check later that
the log still holds it (``--expect HASH``).

Lines written before the chain existed (no ``hash``) may only stand at the head of a log:
they are counted, not verified. A chained log whose last line does not verify is never
extended (:func:`last_hash` refuses it), so damage cannot be buried under new lines.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from meddx.errors import ServingError

__all__ = ["GENESIS", "chain_line", "check_line", "last_hash", "verify_log", "Verdict",
           "BrokenLine"]

GENESIS = "0" * 64
_SUFFIX = re.compile(rb',"hash":"([0-9a-f]{64})"\}$')
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TAIL_BLOCK = 1 << 16


class BrokenLine(ValueError):
    """A line that does not verify; ``reason`` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def chain_line(body: str, prev: str) -> tuple[str, str]:
    """Chain one compact JSON object ``body`` (``{…}``) after the line whose hash is ``prev``.

    Returns:
        (the line to write, newline included; its hash).
    """
    content = f'{body[:-1]},"prev":"{prev}"}}'
    digest = hashlib.sha256(content.encode()).hexdigest()
    return f'{content[:-1]},"hash":"{digest}"}}\n', digest


def check_line(raw: bytes) -> tuple[str, str]:
    """Verify one line (without its newline) on its own.

    Returns:
        (its ``prev``, its ``hash``).

    Raises:
        BrokenLine: no hash, content that does not match it, or no valid ``prev``.
    """
    m = _SUFFIX.search(raw)
    if m is None:
        raise BrokenLine("it carries no hash (cut short, edited, or written before the chain)")
    content = raw[:m.start()] + b"}"
    digest = m.group(1).decode()
    if hashlib.sha256(content).hexdigest() != digest:
        raise BrokenLine("it was edited: its content does not match its hash")
    try:
        prev = json.loads(content).get("prev")
    except (ValueError, AttributeError) as e:
        raise BrokenLine("it is not a JSON object") from e
    if not isinstance(prev, str) or not _HEX64.match(prev):
        raise BrokenLine("its prev field is missing or not a sha256")
    return prev, digest


def _is_unchained(raw: bytes) -> bool:
    """A well-formed line written before the chain existed (JSON object, no prev/hash)."""
    try:
        record = json.loads(raw)
    except ValueError:
        return False
    return isinstance(record, dict) and "hash" not in record and "prev" not in record


def _last_line(path: Path) -> tuple[bytes, bool]:
    """The last line of ``path`` (without newline) and whether it ends with a newline."""
    with path.open("rb") as f:
        end = f.seek(0, 2)
        buf, pos = b"", end
        while pos > 0:
            step = min(_TAIL_BLOCK, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
            if buf.count(b"\n") >= 2 or (buf.count(b"\n") == 1 and not buf.endswith(b"\n")):
                break
    complete = buf.endswith(b"\n")
    lines = buf.rstrip(b"\n").split(b"\n") if complete else buf.split(b"\n")
    return lines[-1], complete


def last_hash(path: str | Path) -> str:
    """The hash a new line must name as ``prev`` to extend the log at ``path``.

    A missing or empty file, or one holding only lines written before the chain, starts a
    chain (:data:`GENESIS`).

    Raises:
        ServingError: the last line is cut short or does not verify; the log is then left
            alone (never extended), and the message says what to do.
    """
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        return GENESIS
    raw, complete = _last_line(p)
    hint = (f"run `meddx audit verify {p}` to see what changed; keep this file as evidence "
            "and give the service a new --audit-log")
    if not complete:
        raise ServingError(f"the audit log {p} ends with a cut-short line; refusing to extend "
                           "it", path=str(p), hint=hint)
    try:
        return check_line(raw)[1]
    except BrokenLine as e:
        if _is_unchained(raw) and b'"hash":"' not in p.read_bytes():
            return GENESIS  # a log from before the chain: the chain starts after it
        raise ServingError(f"the last line of the audit log {p} does not verify ({e.reason});"
                           " refusing to extend it", path=str(p), hint=hint) from e


@dataclass(frozen=True)
class Verdict:
    """What :func:`verify_log` found.

    Attributes:
        ok: every chained line verifies.
        lines: lines read.
        unchained: lines at the head written before the chain (counted, not verified).
        bad_line: the first line (1-based) that does not verify, else None.
        reason: why it does not.
        last_hash: hash of the last good line (to keep elsewhere against truncation).
    """

    ok: bool
    lines: int
    unchained: int = 0
    bad_line: int | None = None
    reason: str | None = None
    last_hash: str = GENESIS


def verify_log(path: str | Path, expect: str | None = None) -> Verdict:
    """Walk the audit log and name the first line that was edited, deleted or moved.

    Args:
        path: the log.
        expect: a line hash noted earlier (``last_hash`` of a previous check); the log must
            still hold that line, which shows it was not cut short at the end since.

    Raises:
        ServingError: the file cannot be read.
    """
    p = Path(path)
    try:
        f = p.open("rb")
    except OSError as e:
        raise ServingError(f"cannot read the audit log {p}", path=str(p)) from e
    prev, n, unchained, chained, seen = GENESIS, 0, 0, False, False
    with f:
        for n, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                return Verdict(False, n, unchained, n, "it is cut short (no newline at the "
                               "end of the file)", prev)
            raw = raw[:-1]
            if not chained and _is_unchained(raw):
                unchained += 1
                continue
            try:
                line_prev, digest = check_line(raw)
            except BrokenLine as e:
                return Verdict(False, n, unchained, n, e.reason, prev)
            if line_prev != prev:
                where = "the start of the log" if n - unchained == 1 else f"line {n - 1}"
                return Verdict(False, n, unchained, n, "its prev does not match the hash of "
                               f"{where}: a line before it was deleted, inserted or moved, or "
                               f"{where} was rewritten", prev)
            prev, chained = digest, True
            seen = seen or digest == expect
    if expect is not None and not seen:
        return Verdict(False, n, unchained, None, f"no line has the expected hash {expect[:16]}…:"
                       " lines were cut from the end of the log (or it is another log)", prev)
    return Verdict(True, n, unchained, None, None, prev)
