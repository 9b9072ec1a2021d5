"""Cost of the hash-chained audit log: microseconds per line, before and after chaining.

Baseline (measured in the same run): the writer as it was before chaining — one ``json.dumps``,
a write and a flush under a lock. Chained: :class:`meddx.serving.audit.AuditLog` (canonical
JSON with ``prev``, one sha256, ``hash`` appended). Both write the same realistic prediction
event (a batch of 1 and of 8 inputs) to a file in a temporary folder, without fsync, in
alternating rounds; the median round is reported. Also: opening a long log (reading its last
line) and ``verify_log`` throughput.

    python benchmarks/audit.py [--lines 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment, write  # noqa: E402

from meddx.serving.audit import AuditLog, _summary, verify_log  # noqa: E402


class UnchainedLog:
    """The writer before chaining (baseline)."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")

    def write(self, event: dict) -> None:
        record = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), **event}
        line = json.dumps(record, default=str, separators=(",", ":")) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        self._file.close()


def event(batch: int) -> dict:
    return {"event": "predict", "route": "/v1/models/{name}/predict", "status": 200,
            "caller": {"kind": "api_key", "id": "ward-7"},
            "model": {"name": "breast", "version": "1.0.0", "sha256": "ab" * 32},
            "inputs": [f"{i:064x}" for i in range(batch)],
            "outputs": [_summary({"label": "malignant", "decision": "refer", "calibrated": True,
                                  "probabilities": [0.1234567, 0.8765433],
                                  "operating_point": "sensitivity", "threshold": 0.31})
                        for _ in range(batch)],
            "request_id": "0f" * 16}


def per_line_us(cls, folder: Path, ev: dict, lines: int) -> float:
    path = folder / f"{cls.__name__}.jsonl"
    path.unlink(missing_ok=True)
    log = cls(path)
    t = time.perf_counter()
    for _ in range(lines):
        log.write(ev)
    dt = time.perf_counter() - t
    log.close()
    return dt / lines * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lines", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for batch in (1, 8):
            ev = event(batch)
            runs = {"unchained (before)": [], "chained (after)": []}
            for _ in range(args.rounds):
                runs["unchained (before)"].append(per_line_us(UnchainedLog, folder, ev,
                                                              args.lines))
                runs["chained (after)"].append(per_line_us(AuditLog, folder, ev, args.lines))
            rows[batch] = {k: round(statistics.median(v), 2) for k, v in runs.items()}
            rows[batch]["line_bytes"] = len((folder / "AuditLog.jsonl").read_text()
                                            .splitlines()[0])
        log_path = folder / "AuditLog.jsonl"  # the last chained log: args.lines lines, batch 8
        t = time.perf_counter()
        for _ in range(100):
            AuditLog(log_path).close()
        open_ms = (time.perf_counter() - t) / 100 * 1e3
        t = time.perf_counter()
        check = verify_log(log_path)
        verify_s = time.perf_counter() - t
        assert check.ok and check.lines == args.lines
        size_mb = log_path.stat().st_size / 1e6
    env = environment()
    data = {"environment": env, "lines_per_round": args.lines, "rounds": args.rounds,
            "per_line_us": {str(b): r for b, r in rows.items()},
            "open_ms": round(open_ms, 3), "verify_lines_per_s": round(args.lines / verify_s),
            "verify_log_mb": round(size_mb, 2)}
    md = ["# Audit log: cost of the hash chain\n",
          f"CPU: {env['cpu']} ({env['cores']} cores, load {env['load_avg']:.1f}), "
          f"commit {env['commit']}, {env['date']}. {args.lines} lines per round, median of "
          f"{args.rounds} alternating rounds, no fsync, local disk (tmp).\n",
          "| inputs per line | line bytes | before: unchained µs/line | after: chained µs/line "
          "| added µs/line |", "|---|---|---|---|---|"]
    for b, r in rows.items():
        before, after = r["unchained (before)"], r["chained (after)"]
        md.append(f"| {b} | {r['line_bytes']} | {before} | {after} | {after - before:+.2f} |")
    md += ["", f"Opening a {args.lines}-line log ({size_mb:.1f} MB) to continue its chain: "
           f"{open_ms:.3f} ms (reads the last line only). `verify_log`: "
           f"{data['verify_lines_per_s']:,} lines/s.", "",
           "Reproduce: `PYTHONPATH=src python benchmarks/audit.py`", ""]
    write("audit", data, "\n".join(md))


if __name__ == "__main__":
    main()
