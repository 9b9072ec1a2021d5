"""Overload of ``meddx serve`` over loopback: goodput with the admission queue vs without it.

Starts the real service (``meddx serve`` in a subprocess on 127.0.0.1, torch backend, a tiny
BreastMNIST ResNet-18 package) with ``--max-in-flight L`` and measures, in one run:

* **unloaded**: ``L`` closed-loop clients (as many as the service admits) — its throughput is
  the reference; and one client (the service time of one request);
* **2× overload, closed loop**: ``2L`` clients, each sending its next request as soon as it
  has an answer (a refused one at once again, as ``serve_load.py`` did), until ``N`` requests
  were served — with the queue (``--queue-size L``) and without it (``--queue-size 0``, the
  behaviour before issue 16: the same-run baseline);
* **2× overload, open loop**: requests arriving at random (Poisson) at twice the unloaded
  throughput, never retried — with and without the queue.

Goodput is served requests (200) per second of wall time; latency percentiles are of the
served requests (send to answer, queueing included). After each service stops, its audit log
must verify (``meddx audit verify``) and hold one ``predict`` line per served request.
Then the cost of one audit line with and without the hash chain (in-process micro benchmark).

Writes ``benchmarks/results/overload.json`` and ``.md``. Client and server share the CPU.

    python benchmarks/overload.py                      # trains/reuses a tiny package
    python benchmarks/overload.py --package runs/breast/model
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import free_port, keys, png_images  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CACHE = Path.home() / ".cache" / "meddx" / "bench" / "overload-breast"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def tiny_package() -> Path:
    """A BreastMNIST ResNet-18 trained 2 epochs on 160 images (as the tests' fixture),
    cached under ``~/.cache/meddx/bench``: the service's cost per request, not its accuracy,
    is what is measured."""
    model = CACHE / "model"
    if (model / "manifest.json").is_file():
        return model
    from meddx.training import train

    train({"name": "breast-tiny", "seed": 0, "data": {"dataset": "breastmnist", "limit": 160},
           "train": {"epochs": 2, "batch_size": 32, "early_stopping_patience": None}},
          out=CACHE, progress=False)
    return model


class Service:
    """``meddx serve`` in a subprocess, with the given admission queue."""

    def __init__(self, package: Path, work: Path, args: argparse.Namespace,
                 queue_size: int) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.audit = work / f"audit-q{queue_size}-{self.port}.jsonl"
        cmd = [sys.executable, "-c", "from meddx.cli import main; main()", "-q", "serve",
               str(package), "--port", str(self.port), "--api-key-file",
               str(work / "api-keys.json"), "--research-use", "--backend", args.backend,
               "--threads", str(args.threads), "--workers", str(args.workers),
               "--max-in-flight", str(args.limit), "--queue-size", str(queue_size),
               "--queue-timeout-s", str(args.queue_timeout_s), "--audit-log",
               str(self.audit), "--no-cds-explain"]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("meddx serve exited: " + self.proc.stderr.read().decode())
            try:
                if httpx.get(f"{self.base}/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("meddx serve did not become ready")

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _summary(lat_ok: list[float], codes: dict[int, int], wall: float, served: int,
             svc: Service, cpu0: float, ccpu0: float) -> dict[str, Any]:
    arr = np.asarray(lat_ok) * 1000 if lat_ok else np.asarray([np.nan])
    attempts = sum(codes.values())
    return {"served": served, "attempts": attempts, "status": codes,
            "refused_429": codes.get(429, 0), "wall_s": wall, "goodput_rps": served / wall,
            "p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)),
            "max_ms": float(np.max(arr)),
            "server_cpu_ms_per_served": 1000 * (svc.cpu_s() - cpu0) / max(served, 1),
            "client_cpu_ms_per_served": 1000 * (time.process_time() - ccpu0) / max(served, 1)}


def _request(session: aiohttp.ClientSession, url: str, auth: dict[str, str], png: bytes):
    data = aiohttp.FormData()
    data.add_field("file", png, filename="x.png", content_type="image/png")
    return session.post(url, headers=auth, data=data)


async def closed_loop(svc: Service, token: str, pngs: list[bytes], clients: int, served: int,
                      max_attempts: int, warmup: int = 8) -> dict[str, Any]:
    """``clients`` clients, each sending its next request on every answer, until ``served``
    requests were answered 200 (or ``max_attempts`` were sent)."""
    url, auth = f"{svc.base}/v1/models/{NAME}/predict", {"Authorization": f"Bearer {token}"}
    lat_ok: list[float] = []
    codes: dict[int, int] = {}
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for i in range(warmup):
            async with _request(session, url, auth, pngs[i % len(pngs)]) as r:
                await r.read()
        cpu0, ccpu0 = svc.cpu_s(), time.process_time()
        counter = iter(range(max_attempts))

        async def client() -> None:
            for i in counter:
                if len(lat_ok) >= served:
                    return
                t = time.perf_counter()
                try:
                    async with _request(session, url, auth, pngs[i % len(pngs)]) as r:
                        await r.read()
                        code = r.status
                except (TimeoutError, aiohttp.ClientError):
                    code = -1
                codes[code] = codes.get(code, 0) + 1
                if code == 200:
                    lat_ok.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(clients)])
        wall = time.perf_counter() - start
    out = _summary(lat_ok, codes, wall, len(lat_ok), svc, cpu0, ccpu0)
    out.update(clients=clients, kind="closed loop")
    return out


async def open_loop(svc: Service, token: str, pngs: list[bytes], rate: float, arrivals: int,
                    seed: int = 0) -> dict[str, Any]:
    """``arrivals`` requests at exponential gaps (mean 1/``rate``), none retried; the wall time
    runs from the first arrival to the last answer."""
    url, auth = f"{svc.base}/v1/models/{NAME}/predict", {"Authorization": f"Bearer {token}"}
    rng = random.Random(seed)
    lat_ok: list[float] = []
    codes: dict[int, int] = {}
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        cpu0, ccpu0 = svc.cpu_s(), time.process_time()

        async def one(i: int) -> None:
            t = time.perf_counter()
            try:
                async with _request(session, url, auth, pngs[i % len(pngs)]) as r:
                    await r.read()
                    code = r.status
            except (TimeoutError, aiohttp.ClientError):
                code = -1
            codes[code] = codes.get(code, 0) + 1
            if code == 200:
                lat_ok.append(time.perf_counter() - t)

        tasks = []
        start = time.perf_counter()
        due = start
        for i in range(arrivals):
            due += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.ensure_future(one(i)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    out = _summary(lat_ok, codes, wall, len(lat_ok), svc, cpu0, ccpu0)
    out.update(rate_rps=rate, arrivals=arrivals, kind="open loop")
    return out


def audit_check(svc: Service, served: int) -> dict[str, Any]:
    from meddx.serving.audit_chain import verify_log

    v = verify_log(svc.audit)
    predicts = sum(1 for x in svc.audit.read_text().splitlines()
                   if json.loads(x).get("event") == "predict")
    return {"audit_verifies": v.ok, "audit_lines": v.lines, "audit_predict_lines": predicts,
            "served_total": served}


def audit_cost(n: int = 20_000) -> dict[str, Any]:
    """µs per audit line, chained (AuditLog) vs the writer before the chain (same JSON, no
    hash), on a typical predict event; and lines per second ``verify_log`` checks."""
    from datetime import UTC, datetime

    from meddx.serving.audit import AuditLog
    from meddx.serving.audit_chain import verify_log

    event = {"event": "predict", "route": "/v1/models/{name}/predict", "status": 200,
             "caller": {"kind": "api-key", "key_id": "bench"},
             "model": {"name": "breast-tiny", "version": "1.0.0", "sha256": "ab" * 32},
             "inputs": ["cd" * 32], "outputs": [{"label": "malignant", "decision": "malignant",
                                                 "calibrated": True,
                                                 "probabilities": [0.27, 0.73],
                                                 "prediction_set": ["malignant"]}]}

    class Plain(AuditLog):  # the write() of the log before the chain, for the same-run baseline
        def write(self, ev: dict[str, Any]) -> None:
            record = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), **ev}
            line = json.dumps(record, default=str, separators=(",", ":")) + "\n"
            with self._lock:
                self._file.write(line)
                self._file.flush()

    out: dict[str, Any] = {"lines": n}
    with tempfile.TemporaryDirectory() as tmp:
        for label, cls in (("plain", Plain), ("chained", AuditLog), ("plain_again", Plain),
                           ("chained_again", AuditLog)):
            path = Path(tmp) / f"{label}.jsonl"
            log = cls(path)
            t = time.perf_counter()
            for _ in range(n):
                log.write(event)
            out[f"{label}_us_per_line"] = 1e6 * (time.perf_counter() - t) / n
            log.close()
            out[f"{label}_bytes_per_line"] = path.stat().st_size / n
        t = time.perf_counter()
        assert verify_log(Path(tmp) / "chained.jsonl").ok
        out["verify_lines_per_s"] = n / (time.perf_counter() - t)
    for k in ("plain", "chained"):
        out[f"{k}_us_per_line"] = min(out.pop(f"{k}_us_per_line"),
                                      out.pop(f"{k}_again_us_per_line"))
        out.pop(f"{k}_again_bytes_per_line")
    out["chain_cost_us_per_line"] = out["chained_us_per_line"] - out["plain_us_per_line"]
    return out


NAME = "breast-tiny"


def run(args: argparse.Namespace) -> dict[str, Any]:
    global NAME
    from meddx.package import load_package

    package = args.package or tiny_package()
    NAME = load_package(package).card.name
    pngs = png_images(32)
    result: dict[str, Any] = {"package": str(package), "scenarios": {}, "audit_logs": {}}
    rows = result["scenarios"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        token, _ = keys(work)
        for rnd in range(1, args.rounds + 1):
            for queue in (args.limit, 0):  # with the queue, then the behaviour before it
                tag = f"queue {queue}" if queue else "no queue (before)"
                here: dict[str, Any] = {}
                svc = Service(package, work, args, queue)
                try:
                    if rnd == 1 and queue:
                        here["1 client (service time)"] = asyncio.run(
                            closed_loop(svc, token, pngs, 1, args.served // 4, args.served))
                    here["unloaded"] = asyncio.run(
                        closed_loop(svc, token, pngs, args.limit, args.served, args.served))
                    capacity = here["unloaded"]["goodput_rps"]
                    here["2× overload, closed loop"] = asyncio.run(
                        closed_loop(svc, token, pngs, 2 * args.limit, args.served,
                                    args.served * 50))
                    here["2× overload, open loop"] = asyncio.run(
                        open_loop(svc, token, pngs, 2 * capacity, 2 * args.served))
                finally:
                    svc.stop()
                warmups = 8 * sum(1 for r in here.values() if r["kind"] == "closed loop")
                result["audit_logs"][f"round {rnd}, {tag}"] = audit_check(
                    svc, sum(r["served"] for r in here.values()) + warmups)
                for k, r in here.items():  # goodput against this service's own unloaded run
                    r["goodput_ratio"] = r["goodput_rps"] / capacity
                    r.update(round=rnd, queue=queue)
                    rows[f"{k}, {tag}, round {rnd}"] = r
                    print(rnd, tag, k, {x: (round(v, 2) if isinstance(v, float) else v)
                                        for x, v in r.items() if x in (
                                            "served", "attempts", "refused_429", "goodput_rps",
                                            "goodput_ratio", "p50_ms", "p99_ms")}, flush=True)
    result["audit_cost"] = audit_cost()
    result["setup"] = (f"{cpu_name()}, {os.cpu_count()} CPUs visible ({args.note}); "
                       f"--max-in-flight {args.limit}, --workers {args.workers} × "
                       f"{args.threads} thread(s), {args.backend} backend, queue "
                       f"{args.limit} places / {args.queue_timeout_s:g} s; loopback, aiohttp "
                       "load generator on the same CPUs")
    over = [r for r in rows.values() if r["queue"] and "overload" in _name(rows, r)]
    result["min_goodput_ratio_with_queue"] = min(r["goodput_ratio"] for r in over)
    result["target_goodput_ratio"] = 0.90
    return result


def _name(rows: dict[str, Any], row: dict[str, Any]) -> str:
    return next(k for k, v in rows.items() if v is row)


def write(result: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "overload.json").write_text(json.dumps(result, indent=2))
    rows = result["scenarios"]
    lines = ["# meddx serve under overload (loopback)", "", result["setup"], "",
             f"Package `{result['package']}`.", "",
             f"Lowest goodput ratio under 2× overload with the queue: "
             f"{result['min_goodput_ratio_with_queue']:.2f} (target ≥ "
             f"{result['target_goodput_ratio']:.2f}).", "",
             "| scenario | clients / arrival rate | served | attempts | 429 | goodput req/s | "
             "goodput / unloaded | p50 ms (served) | p99 ms (served) | server CPU ms/served |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        load = (f"{r['clients']} client(s)" if r["kind"] == "closed loop"
                else f"{r['rate_rps']:.0f} req/s × {r['arrivals']}")
        lines.append(f"| {name} | {load} | {r['served']} | {r['attempts']} | "
                     f"{r['refused_429']} | {r['goodput_rps']:.1f} | {r['goodput_ratio']:.2f} | "
                     f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                     f"{r['server_cpu_ms_per_served']:.1f} |")
    lines += ["", "Audit logs after each service stopped: " + "; ".join(
        f"{k}: verifies {v['audit_verifies']}, {v['audit_lines']} lines, "
        f"{v['audit_predict_lines']} predict lines for {v['served_total']} served (warm-up "
        "included)" for k, v in result["audit_logs"].items()) + "."]
    a = result["audit_cost"]
    lines += ["", f"Audit line cost ({a['lines']} predict events, in-process, best of two): "
              f"{a['plain_us_per_line']:.1f} µs without the chain, {a['chained_us_per_line']:.1f}"
              f" µs with it (+{a['chain_cost_us_per_line']:.1f} µs, "
              f"{a['chained_bytes_per_line'] - a['plain_bytes_per_line']:.0f} bytes more per "
              f"line); `meddx audit verify` checks {a['verify_lines_per_s']:,.0f} lines/s.", "",
              "Goodput = requests answered 200 per second of wall time; 'unloaded' = as many "
              "closed-loop clients as the service admits, measured on the same service just "
              "before its overload rows (the ratio's denominator: the shared CPUs drift). Closed loop: a refused client sends "
              "again at once (as in serve_load.py, whose overload row measured 14 served of 240). "
              "Open loop: Poisson arrivals at twice the unloaded throughput, never retried.", "",
              "Read the server CPU column with the goodput: with the queue a served request "
              "costs the service about what it costs unloaded, so a ratio above 1 is the shared "
              "CPUs giving the service a larger share at that moment, not extra capacity. "
              "Without the queue every 429 costs server CPU too, and on this box the load "
              "generator's retry storm competes for the same two cores (on a real deployment "
              "the clients run elsewhere, but the service still answers every 429).", "",
              "Reproduce: `python benchmarks/overload.py`"]
    (RESULTS / "overload.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", type=Path, help="a BreastMNIST package (default: a tiny one, "
                    "trained once into ~/.cache/meddx/bench)")
    ap.add_argument("--limit", type=int, default=8, help="--max-in-flight (overload = 2×)")
    ap.add_argument("--served", type=int, default=320, help="served requests per scenario")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (queue, no queue)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--queue-timeout-s", type=float, default=2.0)
    ap.add_argument("--note", default="2-core VM shared with other jobs")
    ap.add_argument("--rewrite", action="store_true", help="only render overload.md again "
                    "from overload.json")
    args = ap.parse_args()
    result = (json.loads((RESULTS / "overload.json").read_text()) if args.rewrite
              else run(args))
    write(result)
    print((RESULTS / "overload.md").read_text())


if __name__ == "__main__":
    main()
