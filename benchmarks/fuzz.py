"""Fuzz every reader: ≥ 1,000 mutated real inputs each, crashes and hangs counted.

Each reader runs in its own worker process (fork), one case at a time, under a per-case alarm
(``--timeout`` seconds). A case is a crash when it raises anything outside
``meddx.errors.MeddxError``; a hang when the alarm fires, or when the worker stops answering
(native code that ignores the alarm) and is killed; a worker that dies (segfault, abort) is a
crash too, and a fresh worker takes over at the next case. Cases are numbered: ``seed`` picks
the corpus file and the mutations, so any finding is reproduced with
``python -c "import sys; sys.path.insert(0, 'tests'); import fuzz_support as F;
print(F.run_case('png', 1234))"``.

Baseline measured in the same run: the unmutated seed corpus (every seed must be read or
refused with a MeddxError, never crash).

Usage: ``MEDDX_DATA=../shared/data python benchmarks/fuzz.py [--cases 1000] [--readers png dicom]``
"""

from __future__ import annotations

import argparse
import collections
import logging
import multiprocessing as mp
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import environment, write  # noqa: E402

import fuzz_support as F  # noqa: E402


class _Hang(BaseException):  # not an Exception: run_case must not take it for a crash
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Hang()


def _worker(name: str, conn: Any, timeout: float) -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.CRITICAL)
    signal.signal(signal.SIGALRM, _alarm)
    F.run_case(name, -1)  # seeds, specs and libraries loaded before the first timed case
    conn.send("ready")
    while True:
        seed = conn.recv()
        if seed is None:
            return
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            out = F.run_case(name, seed)  # seed < 0: the unmutated corpus file -seed - 1
        except _Hang:
            out = F.Outcome(name, seed, "hang", "timeout", f"over {timeout:g} s")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        conn.send((out.__dict__, time.perf_counter() - t0))


class Pool:
    """One reader's worker process, restarted after a native crash or a stuck case."""

    def __init__(self, name: str, timeout: float) -> None:
        self.name, self.timeout = name, timeout
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(self.name, child, self.timeout),
                                daemon=True)
        self.proc.start()
        if not self.conn.poll(300) or self.conn.recv() != "ready":
            raise RuntimeError(f"worker for {self.name} did not start")

    def run(self, seed: int) -> tuple[dict[str, Any], float]:
        t0 = time.perf_counter()
        self.conn.send(seed)
        if self.conn.poll(self.timeout + 10):
            try:
                return self.conn.recv()
            except EOFError:
                pass
        alive = self.proc.is_alive()
        self.proc.kill()
        self.proc.join()
        code = self.proc.exitcode
        self.restarts += 1
        self._start()
        kind, err = ("hang", "killed") if alive else ("crash", f"worker died (exit {code})")
        return {"reader": self.name, "seed": seed, "kind": kind, "error": err,
                "message": err}, time.perf_counter() - t0

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(5)


def fuzz_reader(name: str, cases: int, timeout: float) -> dict[str, Any]:
    pool = Pool(name, timeout)
    baseline = [pool.run(-i - 1)[0] for i in range(len(F.corpus(name)))]
    kinds: collections.Counter = collections.Counter()
    messages: collections.Counter = collections.Counter()
    findings: list[dict[str, Any]] = []
    times = []
    t0 = time.perf_counter()
    for seed in range(cases):
        out, dt = pool.run(seed)
        times.append(dt)
        kinds[out["kind"]] += 1
        if out["kind"] == "rejected":
            messages[f"{out['error']}: {_shape(out['message'])}"] += 1
        elif out["kind"] in ("crash", "hang"):
            findings.append(out)
    pool.close()
    times.sort()
    return {
        "reader": name, "what": F.TARGETS[name].what, "cases": cases,
        "corpus": len(baseline),
        "baseline": {k: sum(1 for b in baseline if b["kind"] == k)
                     for k in ("accepted", "rejected", "crash", "hang")},
        "accepted": kinds["accepted"], "rejected": kinds["rejected"],
        "crashes": kinds["crash"], "hangs": kinds["hang"],
        "findings": findings[:20], "worker_restarts": pool.restarts,
        "seconds": round(time.perf_counter() - t0, 1),
        "ms_median": round(1000 * times[len(times) // 2], 2),
        "ms_max": round(1000 * times[-1], 1),
        "top_messages": messages.most_common(5),
    }


def _shape(message: str | None) -> str:
    """A message with its variable parts (numbers, quoted values, paths) blanked, so that
    messages of one kind count together."""
    import re

    text = (message or "").split(" (")[0]
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
    return re.sub(r"-?\d[\d.,e+-]*", "N", text)[:110]


def markdown(rows: list[dict[str, Any]], env: dict[str, Any], cases: int, timeout: float) -> str:
    lines = [
        "# Fuzzing the readers",
        "",
        f"{cases:,} mutated cases per reader from real seed inputs (bundled data), each through "
        "the entry point users hit; per-case timeout "
        f"{timeout:g} s in a separate worker process. A crash is any exception outside "
        "`meddx.errors.MeddxError`; a hang is a case over the timeout. Baseline: the unmutated "
        "seed corpus in the same run.",
        "",
        f"CPU: {env['cpu']} ({env['cores']} cores, load {env['load_avg']:.1f}); "
        f"commit {env['commit']}; {env['date']}",
        "",
        "| reader | entry point | seeds (read / refused) | cases | read | refused (MeddxError) "
        "| crashes | hangs | median ms | max ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        b = r["baseline"]
        lines.append(
            f"| {r['reader']} | {r['what']} | {r['corpus']} ({b['accepted']} / {b['rejected']}"
            f"{', ' + str(b['crash']) + ' crash' if b['crash'] else ''}) | {r['cases']:,} | "
            f"{r['accepted']} | {r['rejected']} | **{r['crashes']}** | **{r['hangs']}** | "
            f"{r['ms_median']} | {r['ms_max']} |")
    total = sum(r["cases"] for r in rows)
    lines += ["", f"Total: {total:,} cases, {sum(r['crashes'] for r in rows)} crashes, "
              f"{sum(r['hangs'] for r in rows)} hangs.", "", "## Most frequent refusals", ""]
    for r in rows:
        top = "; ".join(f"{m} ×{n}" for m, n in r["top_messages"][:3])
        lines.append(f"- **{r['reader']}**: {top}")
    found = [f for r in rows for f in r["findings"]]
    if found:
        lines += ["", "## Crashes and hangs", ""]
        lines += [f"- {f['reader']} case {f['seed']}: {f['kind']} {f['error']}: "
                  f"{(f['message'] or '')[:160]}" for f in found[:40]]
    lines += ["", "Reproduce: `MEDDX_DATA=../shared/data python benchmarks/fuzz.py "
              f"--cases {cases}`", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--readers", nargs="*", default=list(F.TARGETS))
    ap.add_argument("--name", default="fuzz")
    args = ap.parse_args()
    env = environment()
    rows = []
    for name in args.readers:
        row = fuzz_reader(name, args.cases, args.timeout)
        print(f"{name}: {row['cases']} cases, {row['crashes']} crashes, {row['hangs']} hangs, "
              f"{row['seconds']} s", flush=True)
        rows.append(row)
    write(args.name, {"environment": env, "cases_per_reader": args.cases,
                      "timeout_s": args.timeout, "readers": rows},
          markdown(rows, env, args.cases, args.timeout))


if __name__ == "__main__":
    main()
