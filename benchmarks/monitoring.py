"""Monitoring: the cost of ``/metrics`` counting per request, and drift seen on real data.

1. **Overhead.** Two ``meddx serve`` processes with the same BreastMNIST package, one with
   ``--metrics open`` and one with ``--metrics off`` (the request-id middleware runs in both;
   "off" skips the Prometheus series). One sequential client sends the BreastMNIST test PNGs
   to ``POST /v1/models/{name}/predict``, alternating between the two servers request by
   request, so that the machine's load falls on both alike; p50/p90 latency of each. Beside
   it, in-process micro-timings of what metrics add per request (``ServiceMetrics.observe``)
   and of the per-input statistics logged for drift (``input_stats`` on a 28×28 input).
2. **Drift on real data.** The metrics-on server's audit log then holds three runs of the
   whole BreastMNIST test split: as is, brightened (+60 grey levels, clipped at 255), and
   the RetinaMNIST test split (fundus photographs, another modality altogether) sent to the
   same breast model. ``meddx monitor`` compares each run (a window of one split) with the
   package's training reference; outcomes of the breast images are joined by request id.

    python benchmarks/monitoring.py --package runs/breast/model

Without ``--package`` it trains ``configs/breastmnist.yaml`` into ``runs/breast`` first (about
30 minutes on two cores). A package trained before monitoring existed gets its reference
with :func:`meddx.training.posthoc.add_reference`. Writes
``benchmarks/results/monitoring.json``, ``.md`` and the drift figures
``monitoring_drift.png`` and ``monitoring_distribution.png``.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, environment, start_serve, stop_serve, write  # noqa: E402

NAME_BRIGHT = 60


def _npz(name: str) -> Path:
    from meddx.catalog import data_roots

    for root in data_roots():
        if (root / f"medmnist/{name}.npz").is_file():
            return root / f"medmnist/{name}.npz"
    raise SystemExit(f"medmnist/{name}.npz not found (set MEDDX_DATA)")


def _pngs(images: np.ndarray) -> list[bytes]:
    from PIL import Image

    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img.astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _package(args: argparse.Namespace) -> Path:
    from meddx.package import load_package

    if args.package is None:
        out = Path("runs/breast")
        if not (out / "model" / "card.json").is_file():
            subprocess.run([sys.executable, "-c", "from meddx.cli import main; main()", "-q",
                            "train", "configs/breastmnist.yaml", "--out", str(out)], check=True)
        args.package = out / "model"
    if load_package(args.package).card.reference is None:
        from meddx.training.posthoc import add_reference

        print("package has no training reference: fitting it on its calibration split")
        add_reference(args.package)
    return Path(args.package)


class Server:
    """``meddx serve`` in a subprocess (loopback, no auth: a local benchmark)."""

    def __init__(self, package: Path, work: Path, metrics: str, threads: int) -> None:
        with __import__("socket").socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.audit = work / f"audit-{metrics}.jsonl"
        cmd = ["-q", "serve",
               str(package), "--port", str(self.port), "--insecure-no-auth", "--research-use",
               "--backend", "torch", "--threads", str(threads), "--metrics", metrics,
               "--audit-log", str(self.audit)]
        self.proc = start_serve(cmd, self.base, threads)

    def stop(self) -> None:
        stop_serve(self.proc)


def _post(client: httpx.Client, server: Server, name: str, png: bytes) -> tuple[float, Any]:
    t = time.perf_counter()
    r = client.post(f"{server.base}/v1/models/{name}/predict", timeout=60,
                    files={"file": ("x.png", png, "image/png")})
    return time.perf_counter() - t, r


def _quantiles(ms: list[float]) -> dict[str, float]:
    q = np.percentile(ms, [50, 90, 99])
    return {"p50_ms": round(float(q[0]), 2), "p90_ms": round(float(q[1]), 2),
            "p99_ms": round(float(q[2]), 2), "n": len(ms)}


def overhead(on: Server, off: Server, name: str, pngs: list[bytes], rounds: int
             ) -> dict[str, Any]:
    """Alternating sequential requests; p50 with and without metrics, and their difference
    with a bootstrap 95% CI of the difference of medians."""
    lat: dict[str, list[float]] = {"on": [], "off": []}
    with httpx.Client() as client:
        for srv in (on, off):  # warm both
            for png in pngs[:10]:
                _post(client, srv, name, png)
        for r in range(rounds):
            for i, png in enumerate(pngs):
                pair = [("on", on), ("off", off)]
                if (i + r) % 2:
                    pair.reverse()
                for key, srv in pair:
                    dt, resp = _post(client, srv, name, png)
                    assert resp.status_code == 200, resp.text
                    lat[key].append(dt * 1000)
        scrape = [_timed(client, f"{on.base}/metrics") for _ in range(20)]
        size = len(client.get(f"{on.base}/metrics").content)
    rng = np.random.default_rng(0)
    a, b = np.asarray(lat["on"]), np.asarray(lat["off"])
    diffs = [np.median(rng.choice(a, a.size)) - np.median(rng.choice(b, b.size))
             for _ in range(2000)]
    return {"metrics_on": _quantiles(lat["on"]), "metrics_off": _quantiles(lat["off"]),
            "p50_difference_ms": round(float(np.median(a) - np.median(b)), 3),
            "p50_difference_ci95_ms": [round(float(x), 3) for x in np.percentile(diffs,
                                                                                 [2.5, 97.5])],
            "scrape_p50_ms": round(statistics.median(scrape), 2), "scrape_bytes": size}


def _timed(client: httpx.Client, url: str) -> float:
    t = time.perf_counter()
    client.get(url).raise_for_status()
    return (time.perf_counter() - t) * 1000


def micro(package: Path) -> dict[str, float]:
    """Microseconds per request of the metric updates and of the input statistics."""
    import torch

    from meddx.inference import load_model
    from meddx.serving.context import RequestContext
    from meddx.serving.engine import ModelHub
    from meddx.serving.metrics import ServiceMetrics
    from meddx.serving.settings import ServeSettings

    hub = ModelHub([load_model(package, backend="torch")], ServeSettings(insecure_no_auth=True,
                                                                     research_use=True))
    name = next(iter(hub.models))
    m = ServiceMetrics(hub)
    ctx = RequestContext("x", model=name, outputs=[("malignant", False)])
    n = 20000
    observe = timeit.timeit(lambda: m.observe("/v1/models/{name}/predict", name, 200, 0.01,
                                              ctx), number=n) / n * 1e6
    from meddx.training.reference import input_stats

    x = torch.rand(1, 28, 28)
    stats = timeit.timeit(lambda: input_stats(x), number=n) / n * 1e6
    return {"observe_us": round(observe, 2), "input_stats_28x28_us": round(stats, 2)}


def drift(package: Path, audit: Path, names: list[str], outcomes: Path, work: Path,
          window: int) -> dict[str, Any]:
    from meddx.monitoring import monitor

    result = monitor(audit, [package], out=work / "report", outcomes=outcomes,
                     window=str(window), bootstrap=1000)
    (m,) = result["models"]
    rows = []
    for label, w in zip(names, m["windows"], strict=False):
        perf = w.get("performance") or {}
        rows.append({
            "run": label, "answers": w["answers"], "risk_mean": w["risk"].get("mean"),
            "risk_psi": w["risk"].get("psi"), "risk_status": w["risk"].get("status"),
            "risk_psi_null95": w["risk"].get("psi_null95"),
            "inputs": {k: {"psi": d.get("psi"), "status": d.get("status"),
                           "shift_sd": d.get("shift_sd")} for k, d in w["inputs"].items()},
            "auroc": perf.get("auroc"), "ece": perf.get("ece"), "n_outcomes": perf.get("n")})
    _save_figures(work / "report" / "monitor.html")
    return {"windows": rows, "flags": result["flags"], "skipped": result["skipped"],
            "reference": {"n": m["package"]["reference"]["n"],
                          "risk_of": m["package"]["risk_of"]}}


def _save_figures(html: Path) -> None:
    import re

    figs = re.findall(r'alt="(\w+)" src="data:image/png;base64,([^"]+)"', html.read_text())
    for name, data in figs:
        if name in ("drift", "distribution"):
            (RESULTS / f"monitoring_{name}.png").write_bytes(base64.b64decode(data))


def _fmt(x: Any, d: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{d}f}"


def _ci(e: dict[str, Any] | None) -> str:
    if not e or e.get("value") is None:
        return "n/a"
    lo, hi = e.get("low"), e.get("high")
    return f"{e['value']:.3f} ({_fmt(lo)}–{_fmt(hi)})"


def markdown(data: dict[str, Any]) -> str:
    env, o, mi, d = data["environment"], data["overhead"], data["micro"], data["drift"]
    lines = [
        "# Monitoring: /metrics overhead and drift on real data", "",
        f"CPU: {env['cpu']} ({env['cores']} cores, load average {env['load_avg']:.1f} at the "
        f"start, shared with other jobs), torch {env['torch']}, commit {env['commit']}; "
        f"package `{data['package']}` (reference: {d['reference']['n']} calibration cases, "
        f"risk = calibrated P({d['reference']['risk_of']})).", "",
        "## Per-request cost of the Prometheus series", "",
        "Sequential REST predicts of BreastMNIST test PNGs, alternating request by request "
        "between two `meddx serve` processes that differ only in `--metrics`:", "",
        "| server | n | p50 ms | p90 ms | p99 ms |", "|---|---|---|---|---|",
        *[f"| --metrics {k.split('_')[1]} | {v['n']} | {v['p50_ms']} | {v['p90_ms']} | "
          f"{v['p99_ms']} |" for k, v in (("metrics_on", o["metrics_on"]),
                                          ("metrics_off", o["metrics_off"]))], "",
        f"p50 difference (on − off): {o['p50_difference_ms']} ms, bootstrap 95% CI "
        f"{o['p50_difference_ci95_ms'][0]} to {o['p50_difference_ci95_ms'][1]} ms. "
        f"In-process: the metric updates of one request take {mi['observe_us']} µs "
        f"(`ServiceMetrics.observe`), the input statistics logged for drift "
        f"{mi['input_stats_28x28_us']} µs per 28×28 input. A scrape of `/metrics` takes "
        f"{o['scrape_p50_ms']} ms (p50) for {o['scrape_bytes']:,} bytes.", "",
        "## Drift: the BreastMNIST package on its test split and on shifted inputs", "",
        "One window per run (`meddx monitor --window N`), PSI against the package's training "
        "reference (calibration split). Status: stable ≤ 0.1 < moderate ≤ 0.25 < major, "
        "or noise when an unshifted window of that size reaches the PSI by chance.", "",
        "| run | n | mean risk | risk PSI (status) | input mean PSI (shift, SD) | input std "
        "PSI | input extreme PSI | live AUROC (95% CI) | live ECE (95% CI) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for w in d["windows"]:
        i = w["inputs"]
        lines.append(
            f"| {w['run']} | {w['answers']} | {_fmt(w['risk_mean'])} | "
            f"{_fmt(w['risk_psi'])} ({w['risk_status']}) | {_fmt(i['mean']['psi'])} "
            f"({i['mean']['status']}, {_fmt(i['mean']['shift_sd'], 1)}) | "
            f"{_fmt(i['std']['psi'])} ({i['std']['status']}) | {_fmt(i['extreme']['psi'])} "
            f"({i['extreme']['status']}) | {_ci(w['auroc'])} | {_ci(w['ece'])} |")
    lines += ["", "Flags printed by `meddx monitor`:", "",
              *([f"- {f}" for f in d["flags"]] or ["- none"]), "",
              "Figures: `monitoring_drift.png` (PSI per window), `monitoring_distribution.png`"
              " (reference vs live shares per reference bin, all windows).", "",
              f"Reproduce: `{data['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--package", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=2, help="passes over the test PNGs for the "
                    "overhead measurement")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    package = _package(args)
    from meddx.package import load_package

    name = load_package(package).card.name
    with np.load(_npz("breastmnist")) as f:
        images, labels = f["test_images"], f["test_labels"].reshape(-1)
    with np.load(_npz("retinamnist")) as f:
        retina = f["test_images"][: len(images)]
    bright = np.clip(images.astype(int) + NAME_BRIGHT, 0, 255)
    class_names = load_package(package).card.task.class_names
    work = Path(tempfile.mkdtemp(prefix="meddx-monitoring-"))
    on, off = Server(package, work, "open", args.threads), Server(package, work, "off",
                                                                    args.threads)
    try:
        over = overhead(on, off, name, _pngs(images), args.rounds)
        outcome_rows: list[tuple[str, str]] = []
        runs = [("BreastMNIST test", images, True), (f"brightened +{NAME_BRIGHT}", bright, True),
                ("RetinaMNIST test", retina, False)]
        refused: dict[str, int] = {}
        with httpx.Client() as client:
            on.audit.write_text("")  # the drift log holds the three runs only
            for label, imgs, known in runs:
                refused[label] = 0
                for png, y in zip(_pngs(imgs), labels if known else [None] * len(imgs),
                                  strict=False):
                    _, r = _post(client, on, name, png)
                    if r.status_code != 200:
                        refused[label] += 1
                    elif known:
                        outcome_rows.append((r.headers["x-request-id"], class_names[int(y)]))
    finally:
        on.stop()
        off.stop()
    with (work / "outcomes.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("request_id", "outcome"), *outcome_rows])
    data = {"environment": environment(), "package": str(package), "overhead": over,
            "micro": micro(package),
            "drift": drift(package, on.audit, [r[0] for r in runs], work / "outcomes.csv",
                           work, len(images)),
            "refused": refused,
            "command": f"python benchmarks/monitoring.py --package {package}"}
    write("monitoring", data, markdown(data))


if __name__ == "__main__":
    main()
