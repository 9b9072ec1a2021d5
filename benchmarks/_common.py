"""Helpers shared by benchmark scripts: environment description and result writing."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

# MEDDX_BENCH_RESULTS sends a smoke run's figures elsewhere, leaving the measured ones alone
RESULTS = Path(os.environ.get("MEDDX_BENCH_RESULTS") or Path(__file__).parent / "results")
RESULTS.mkdir(parents=True, exist_ok=True)


def environment() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu": cpu,
            "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_avg": os.getloadavg()[0], "commit": commit}


def write(name: str, data: dict[str, Any], markdown: str) -> None:
    """Write results/<name>.json and results/<name>.md and print the markdown."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)


def mean_ci(values: list[float], count_key: str = "n") -> dict[str, Any]:
    """Mean, sd and a t-based 95 % interval of the mean over runs (seeds)."""
    import numpy as np
    from scipy import stats

    v = np.asarray(values, dtype=float)
    out: dict[str, Any] = {"mean": round(float(v.mean()), 4), count_key: len(v)}
    if len(v) > 1:
        sd = float(v.std(ddof=1))
        half = float(stats.t.ppf(0.975, len(v) - 1) * sd / np.sqrt(len(v)))
        out.update(sd=round(sd, 4), ci95=[round(float(v.mean()) - half, 4),
                                          round(float(v.mean()) + half, 4)])
    return out


def start_serve(args: list[str], base: str, threads: int, prelude: str = "",
                timeout_s: float = 180) -> Any:
    """Start ``meddx`` with ``args`` (``-q serve …``; ``prelude``: Python run first in the
    server process) and wait until ``base``/health/ready answers 200; returns the process."""
    import subprocess
    import sys
    import time

    import httpx

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-c", prelude + "from meddx.cli import main; main()", *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("meddx serve exited: " + proc.stderr.read().decode())
        try:
            if httpx.get(f"{base}/health/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("meddx serve did not become ready")


def stop_serve(proc: Any, timeout_s: float = 20) -> None:
    """Stop a server started by :func:`start_serve`: terminate, then kill if it lingers."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
