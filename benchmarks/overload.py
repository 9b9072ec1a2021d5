"""Overload that still serves: goodput of ``meddx serve`` at 2 × its admission limit.

Starts the real service (``meddx serve``, a subprocess on 127.0.0.1) serving a tiny BreastMNIST
package and sends ``POST /v1/models/{name}/predict`` for 8 s per run (at most 5,000 requests)
from closed-loop clients (each sends its next request as soon as the last one is answered, 429
included — as the overload part of ``serve_load.py`` does):

* unloaded: ``max_in_flight`` clients — the baseline throughput (run twice, before and after
  the queued overload on the same service, as the shared CPU drifts);
* 2 × overload with the admission queue (``--queue-size``, default 2 × max_in_flight);
* 2 × overload with ``--queue-size 0`` (the old behaviour: 429 as soon as the limit is full).

Goodput is served requests (200) per second of the run; the ratio is goodput under overload
over the unloaded throughput (target ≥ 0.90). p50/p99 are of the served requests only.
Writes ``benchmarks/results/overload.json`` and ``.md``.

    python benchmarks/overload.py                      # trains a 1-epoch package first
    MEDDX_TEST_SERVING_PACKAGE=runs/x/model python benchmarks/overload.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from _common import environment, write
from serve_load import Service, keys, png_images


def tiny_package(out: Path) -> Path:
    """A BreastMNIST package trained for one epoch on a slice."""
    from meddx.training import train

    pkg = train({"name": "breast-overload", "seed": 0,
                 "data": {"dataset": "breastmnist", "limit": 160},
                 "train": {"epochs": 1, "batch_size": 32, "early_stopping_patience": None}},
                out=out / "run", progress=False)
    return Path(pkg.path)


async def load(url: str, token: str, pngs: list[bytes], seconds: float, cap: int,
               concurrency: int) -> dict[str, Any]:
    """``concurrency`` closed-loop clients sending for ``seconds`` (at most ``cap`` requests
    in all), after 4 warm-ups; requests in flight at the end are waited for and counted."""
    served: list[float] = []
    codes: dict[int, int] = {}
    retry_after: set[str] = set()
    counter = iter(range(cap))
    auth = {"Authorization": f"Bearer {token}"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def one(i: int) -> int:
            data = aiohttp.FormData()
            data.add_field("file", pngs[i % len(pngs)], filename="x.png",
                           content_type="image/png")
            async with session.post(url, headers=auth, data=data) as r:
                await r.read()
                if r.status == 429:
                    retry_after.add(r.headers.get("Retry-After", ""))
                return r.status

        for i in range(4):
            await one(i)

        async def worker() -> None:
            for i in counter:
                if time.perf_counter() > end:
                    return
                t = time.perf_counter()
                try:
                    code = await one(i)
                except (TimeoutError, aiohttp.ClientError):
                    code = -1
                if code == 200:
                    served.append(time.perf_counter() - t)
                codes[code] = codes.get(code, 0) + 1

        start = time.perf_counter()
        end = start + seconds
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - start
    return {"concurrency": concurrency, "wall_s": wall, "codes": codes,
            "retry_after": retry_after, "served_ms": [1000 * x for x in served]}


def summary(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from one or more runs of a condition: sums, and p50/p99 of all served."""
    codes: dict[int, int] = {}
    for part in parts:
        for k, v in part["codes"].items():
            codes[k] = codes.get(k, 0) + v
    wall = sum(part["wall_s"] for part in parts)
    ms = np.asarray([x for part in parts for x in part["served_ms"]] or [np.nan])
    return {"runs": len(parts), "requests": sum(codes.values()),
            "concurrency": parts[0]["concurrency"], "wall_s": round(wall, 2),
            "status": {str(k): v for k, v in sorted(codes.items())},
            "served": codes.get(200, 0), "refused_429": codes.get(429, 0),
            "retry_after": sorted(set().union(*(part["retry_after"] for part in parts))),
            "goodput_rps": round(codes.get(200, 0) / wall, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--package", type=Path, default=os.environ.get("MEDDX_TEST_SERVING_PACKAGE"))
    ap.add_argument("--max-in-flight", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backend", default="onnx")
    ap.add_argument("--seconds", type=float, default=8.0, help="per run")
    ap.add_argument("--cap", type=int, default=5000, help="most requests per run")
    args = ap.parse_args()
    from meddx.package import load_package

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        package = work / "model"
        shutil.copytree(args.package or tiny_package(work), package)
        if args.backend.startswith("onnx"):
            from meddx.inference.onnx import export_onnx

            export_onnx(package, int8=args.backend == "onnx-int8")
        setup_s = time.perf_counter() - t0
        name = load_package(package).card.name
        token, _ = keys(work)
        pngs = png_images(32)
        m = args.max_in_flight
        parts: dict[str, list[dict[str, Any]]] = {}
        # one service with the default queue: unloaded and 2x overload in A-B-B-A order (the
        # shared CPU drifts); then one with --queue-size 0 at 2x overload
        plan = {(): [("unloaded", m), ("2x overload, queue", 2 * m),
                     ("2x overload, queue", 2 * m), ("unloaded", m)],
                ("--queue-size", "0"): [("2x overload, queue 0", 2 * m)] * 2}
        for extra, rows in plan.items():
            svc = Service(package, work, args.backend, args.threads, args.workers, m,
                          extra=extra)
            try:
                url = f"{svc.base}/v1/models/{name}/predict"
                for label, clients in rows:
                    part = asyncio.run(load(url, token, pngs, args.seconds, args.cap, clients))
                    part["queue_size"] = int(extra[1]) if extra else 2 * m
                    parts.setdefault(label, []).append(part)
                    print(label, part["codes"], round(part["wall_s"], 1), flush=True)
            finally:
                svc.stop()
    runs = {label: {**summary(ps), "queue_size": ps[0]["queue_size"]}
            for label, ps in parts.items()}
    base = runs["unloaded"]["goodput_rps"]
    for r in runs.values():
        r["goodput_ratio"] = round(r["goodput_rps"] / base, 3)
    env = environment()
    result = {"environment": env, "max_in_flight": m, "workers": args.workers,
              "threads": args.threads, "backend": args.backend, "runs": runs,
              "target_goodput_ratio": 0.90,
              "meets_target": runs["2x overload, queue"]["goodput_ratio"] >= 0.90,
              "package_setup_s": round(setup_s, 1)}
    lines = ["# Overload that still serves", "",
             f"`meddx serve` on loopback, `{args.backend}` backend, tiny BreastMNIST package; "
             f"max-in-flight {m}, {args.workers} workers × {args.threads} thread(s), queue "
             f"timeout 10 s. CPU: {env['cpu']} ({env['cores']} cores visible, load "
             f"{env['load_avg']:.1f} at the end; client and server share them). Closed-loop "
             f"clients, {args.seconds:g} s per run: each sends its next request as soon as one is "
             "answered (429 included); each condition run twice (unloaded and queued in "
             "A-B-B-A order on one service), figures pooled.",
             "",
             "| run | clients | queue | requests | served | 429 | goodput req/s | "
             "goodput / unloaded | p50 ms (served) | p99 ms (served) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in runs.items():
        lines.append(f"| {label} | {r['concurrency']} | {r['queue_size']} | {r['requests']} | "
                     f"{r['served']} | {r['refused_429']} | {r['goodput_rps']:.1f} | "
                     f"{r['goodput_ratio']:.2f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
    q = runs["2x overload, queue"]
    lines += ["", f"Target: goodput at 2 × overload ≥ 0.90 × unloaded — with the queue "
              f"{q['goodput_ratio']:.2f} ({'met' if result['meets_target'] else 'NOT met'}). "
              f"Refusals carry `Retry-After` {runs['2x overload, queue 0']['retry_after']}.",
              "", "Reproduce: `python benchmarks/overload.py` (or with "
              "`MEDDX_TEST_SERVING_PACKAGE=runs/x/model`)."]
    write("overload", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
