"""CPU inference speed of a BreastMNIST ResNet-18: torch fp32 eager, torch bf16 autocast,
ONNX Runtime fp32 and static INT8, in the same run.

Measures single-image latency (p50/p99 of batch-1 calls, input already preprocessed) and batch
throughput (images/s at batch 64), with ``--threads`` intra-op threads (default 2, the target
machine's cores). Writes ``benchmarks/results/inference.json`` and ``.md``.

    python benchmarks/inference.py --package runs/breast/model      # a trained package
    python benchmarks/inference.py                                   # trains a quick one first

The package is copied to a temporary folder before exporting, so it is never modified.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import RESULTS  # noqa: E402


def quick_package(out: Path) -> Path:
    """A BreastMNIST ResNet-18 trained for one epoch (speed does not depend on the weights)."""
    from meddx.training import train

    pkg = train({"name": "breast-bench", "data": {"dataset": "breastmnist", "limit": 256},
                 "train": {"epochs": 1, "batch_size": 64, "threads": 2}},
                out=out, progress=False)
    return pkg.path


def timed(fn: Any, x: Any, repeats: int, warmup: int = 10) -> tuple[np.ndarray, float]:
    """Wall seconds of each call, and the mean CPU seconds (all threads) per call."""
    for _ in range(warmup):
        fn(x)
    out = np.empty(repeats)
    cpu = time.process_time()
    for i in range(repeats):
        t = time.perf_counter()
        fn(x)
        out[i] = time.perf_counter() - t
    return out, (time.process_time() - cpu) / repeats


def backends(folder: Path, threads: int) -> dict[str, Any]:
    from meddx.inference.onnx import OnnxBackend
    from meddx.package import load_package

    pkg = load_package(folder)
    model = pkg.build_model().float().eval()

    def eager(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    def bf16(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(torch.from_numpy(x)).float().numpy()

    return {"torch fp32 eager": eager, "torch bf16 autocast": bf16,
            "onnxruntime fp32": OnnxBackend(pkg, "fp32", threads).logits,
            "onnxruntime int8 (static QDQ)": OnnxBackend(pkg, "int8", threads).logits}


def measure(folder: Path, threads: int, repeats: int, batch: int) -> dict[str, Any]:
    from meddx.inference import amx_available
    from meddx.package import load_package

    spec = load_package(folder).card.preprocessing
    shape = (spec["channels"], *([spec["size"]] * spec["spatial_dims"]))
    rng = np.random.default_rng(0)
    one = rng.random((1, *shape), dtype=np.float32)
    many = rng.random((batch, *shape), dtype=np.float32)
    rows = {}
    for name, fn in backends(folder, threads).items():
        single, cpu = timed(fn, one, repeats)
        big, _ = timed(fn, many, max(3, repeats // 40), warmup=2)
        rows[name] = {"p50_ms": 1000 * float(np.median(single)),
                      "p99_ms": 1000 * float(np.percentile(single, 99)),
                      "cpu_ms": 1000 * cpu,
                      "throughput_img_s": batch / float(np.median(big))}
        print(f"{name:32s} p50 {rows[name]['p50_ms']:7.2f} ms  p99 {rows[name]['p99_ms']:7.2f} ms"
              f"  cpu {rows[name]['cpu_ms']:6.2f} ms"
              f"  batch{batch} {rows[name]['throughput_img_s']:8.1f} img/s", flush=True)
    base = rows["torch fp32 eager"]
    for r in rows.values():
        r["latency_speedup"] = base["p50_ms"] / r["p50_ms"]
        r["cpu_speedup"] = base["cpu_ms"] / r["cpu_ms"]
        r["throughput_speedup"] = r["throughput_img_s"] / base["throughput_img_s"]
    return {"rows": rows, "input_shape": list(shape), "amx_or_bf16_cpu": amx_available()}


def write(result: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "inference.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# CPU inference: BreastMNIST ResNet-18 (28 px, full-resolution stem)", "",
        f"{result['threads']} intra-op threads; {result['cpu']}; "
        f"bf16/AMX CPU: {result['amx_or_bf16_cpu']}; {result['note']}", "",
        f"| backend | p50 ms (batch 1) | p99 ms | CPU ms per image | img/s (batch "
        f"{result['batch']}) | latency × | CPU × | throughput × |",
        "|---|---|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['cpu_ms']:.2f} | "
                     f"{r['throughput_img_s']:.1f} | {r['latency_speedup']:.2f} | "
                     f"{r['cpu_speedup']:.2f} | {r['throughput_speedup']:.2f} |")
    q = result.get("int8_accuracy")
    if q:
        lines += ["", f"INT8 vs fp32 on the test split (n={q['n']}): accuracy "
                  f"{q['fp32'].get('accuracy', float('nan')):.3f} → "
                  f"{q['int8'].get('accuracy', float('nan')):.3f}, AUROC "
                  f"{q['fp32'].get('auroc', float('nan')):.3f} → "
                  f"{q['int8'].get('auroc', float('nan')):.3f}, decisions agree "
                  f"{q['decision_agreement']:.1%}."]
    lines += ["", "Reproduce: `python benchmarks/inference.py --package runs/breast/model`"]
    (RESULTS / "inference.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--note", default="shared machine: other jobs were running")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from meddx.inference.onnx import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        src = args.package or quick_package(Path(tmp) / "run")
        folder = Path(tmp) / "model"
        shutil.copytree(src, folder)
        report = export_onnx(folder, int8=True)
        result = measure(folder, args.threads, args.repeats, args.batch)
    best = max(result["rows"].items(), key=lambda kv: kv[1]["latency_speedup"])
    result.update(threads=args.threads, batch=args.batch, cpu=platform.processor() or
                  platform.machine(), note=args.note, package=str(src),
                  int8_accuracy=report.get("int8_vs_fp32"),
                  best={"backend": best[0], "latency_speedup": best[1]["latency_speedup"]})
    print(f"best: {best[0]} ({best[1]['latency_speedup']:.2f}× torch fp32 eager latency)")
    write(result)


if __name__ == "__main__":
    main()
