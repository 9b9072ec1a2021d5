"""What the OOD flag costs on the ONNX backend: one image per call, three ways, interleaved.

* ``onnx, no detector``: the export without a ``features`` output and a card without ``ood``
  (the baseline, what a package cost before detectors);
* ``onnx + features output``: the export with the second output, Mahalanobis in numpy;
* ``onnx + torch features``: an old export (no ``features`` output) on a package with a
  detector: the Predictor runs the torch weights as well.

    python benchmarks/ood_onnx.py --model runs/breast/model
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import environment, write


def _variant(src: Path, root: Path, name: str, features: bool, detector: bool) -> Path:
    from meddx.inference.onnx import export_onnx
    from meddx.package import load_package

    folder = root / name
    shutil.copytree(src, folder)
    for f in ("model.onnx", "model.int8.onnx"):
        (folder / f).unlink(missing_ok=True)
    pkg = load_package(folder)
    saved = pkg.card.ood
    if not features:
        pkg.update_card(ood=None)
    export_onnx(pkg)
    if detector and not features:
        pkg = load_package(folder)
        pkg.update_card(ood=saved.model_dump(mode="json"))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    from meddx.inference import load_model

    with np.load("/work/shared/data/medmnist/breastmnist.npz") as d:
        images = list(d["test_images"][:50])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        variants = {"onnx, no detector": _variant(Path(args.model), root, "a", False, False),
                    "onnx + features output": _variant(Path(args.model), root, "b", True, True),
                    "onnx + torch features": _variant(Path(args.model), root, "c", False, True)}
        predictors = {k: load_model(v, backend="onnx", threads=1) for k, v in variants.items()}
        times: dict[str, list[float]] = {k: [] for k in predictors}
        for p in predictors.values():
            p.predict(images[:5])
        for i in range(args.calls):
            for k, p in predictors.items():
                t = time.perf_counter()
                p.predict(images[i % len(images)])
                times[k].append(1000 * (time.perf_counter() - t))
        flags = {k: [q.ood for q in p.predict(images)] for k, p in predictors.items()}
    env = environment()
    rows = {k: {"median_ms": float(np.median(v)), "p90_ms": float(np.percentile(v, 90))}
            for k, v in times.items()}
    same = flags["onnx + features output"] == flags["onnx + torch features"]
    md = ["# OOD flag on the ONNX backend: cost per call (one 28 px image, 1 thread)", "",
          f"CPU: {env['cpu']}; load average {env['load_avg']:.1f} (shared machine); "
          f"{args.calls} calls per variant, interleaved; model {args.model}.", "",
          "| variant | median ms | p90 ms |", "|---|---|---|"]
    md += [f"| {k} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} |" for k, r in rows.items()]
    md += ["", f"Flags of the two detector variants identical on 50 breast test images: {same}.",
           "", f"Reproduce: `python benchmarks/ood_onnx.py --model {args.model}`.", ""]
    write("ood_onnx", {"env": env, "rows": rows, "flags_identical": same,
                       "model": args.model}, "\n".join(md))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
