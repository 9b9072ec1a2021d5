"""Speed of the bootstrap: the vectorised weighted engine against a loop over scikit-learn.

Synthetic predictions shaped like the bundled test splits (BreastMNIST 156 binary cases,
ISIC 2017 600 three-class cases, Tox21 ~1,500 × 12 labels with missing values). The loop is
timed on 50 resamples and scaled to 1,000. Run: ``python benchmarks/evaluation.py``.
Writes ``benchmarks/results/evaluation.json`` and ``.md``.
"""

from __future__ import annotations

import json
import platform
import time

import numpy as np
import torch
from _common import RESULTS as OUT  # noqa: E402

from meddx.statistics.bootstrap import bootstrap_metrics
from meddx.statistics.metrics import compute_metrics
from meddx.tasks import TaskSpec


def _cases() -> list[tuple[str, TaskSpec, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    binary = TaskSpec(kind="binary", class_names=["malignant", "benign"],
                      positive_class="malignant")
    y = rng.integers(0, 2, 156)
    p = 1 / (1 + np.exp(-(2 * y - 1 + rng.normal(0, 1, 156))))
    multi = TaskSpec(kind="multiclass", class_names=["mel", "sk", "nevus"], positive_class="mel")
    ym = rng.integers(0, 3, 600)
    z = rng.normal(size=(600, 3)) + 1.5 * np.eye(3)[ym]
    pm = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    ml = TaskSpec(kind="multilabel", class_names=[f"assay{i}" for i in range(12)])
    yl = rng.integers(0, 2, (1500, 12)).astype(float)
    pl = np.clip(0.3 * yl + rng.uniform(0, 0.7, yl.shape), 0, 1)
    yl[rng.random(yl.shape) < 0.2] = np.nan
    return [("binary, n=156 (BreastMNIST test)", binary, y, np.column_stack([p, 1 - p])),
            ("multiclass, n=600 (ISIC 2017 test)", multi, ym, pm),
            ("multilabel, n=1500 x 12 (Tox21-like)", ml, yl, pl)]


def _loop(task: TaskSpec, y: np.ndarray, p: np.ndarray, n: int) -> float:
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        compute_metrics(task, y[idx], p[idx])
    return time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for name, task, y, p in _cases():
        start = time.perf_counter()
        bootstrap_metrics(task, y, p, n_resamples=1000, seed=0)
        fast = time.perf_counter() - start
        slow = _loop(task, y, p, 50) * 1000 / 50
        rows.append({"case": name, "vectorised_s": round(fast, 3),
                     "sklearn_loop_s_estimated": round(slow, 1),
                     "speedup": round(slow / fast, 1)})
        print(f"{name}: vectorised {fast:.2f} s, sklearn loop ~{slow:.1f} s "
              f"({slow / fast:.0f}x) for 1,000 resamples of every metric")
    meta = {"machine": platform.processor() or platform.machine(), "threads": 1,
            "resamples": 1000, "note": "shared 2-core machine; timings vary with load"}
    OUT.mkdir(exist_ok=True)
    (OUT / "evaluation.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["# Bootstrap speed (1,000 resamples, every metric, 1 thread)", "",
             "| case | vectorised (s) | sklearn loop (s, est.) | speed-up |", "|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['vectorised_s']} | {r['sklearn_loop_s_estimated']} | "
              f"{r['speedup']}x |" for r in rows]
    lines += ["", f"Reproduce: `python benchmarks/evaluation.py` ({meta['note']})."]
    (OUT / "evaluation.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
