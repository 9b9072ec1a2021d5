"""Slide-level models on a synthetic slide set made from the bundled CMU-1-Small-Region slide.

No labelled whole-slide data is staged here (no PathMNIST, no CRC-VAL-HE-7K, no CAMELYON), so
the figures are on *synthetic* slides with *planted* labels: every slide is a random 1024 px
crop (random flips) of the real H&E slide ``CMU-1-Small-Region.svs``; a "tumour" slide has 2-4
squares of 96 px where dense purple dots (nuclei-like texture) are painted over the tissue.
That measures whether the pipeline (tiling → encoder → cached bag → ABMIL) finds a small
planted region, not diagnostic accuracy.

Compared in the same run: ABMIL (gated attention) against mean pooling + logistic regression
on the same cached bags (the baseline), and the encoders' throughput (stats vs a resnet18
forward pass at the same tile size). Writes ``benchmarks/results/wsi_models.{json,md}``.

    nice -n 10 .venv/bin/python benchmarks/wsi_models.py [--slides 40] [--epochs 30]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def make_slides(folder: Path, n: int, seed: int) -> Path:
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from meddx.catalog import data_roots
    from meddx.modalities.pathology.slide import open_slide
    from pathology_model_support import write_slide

    src = next((r / "pathology" / "CMU-1-Small-Region.svs" for r in data_roots()
                if (r / "pathology" / "CMU-1-Small-Region.svs").is_file()), None)
    if src is None:
        raise SystemExit("CMU-1-Small-Region.svs not found: set MEDDX_DATA to the shared data")
    with open_slide(src) as s:
        w, h = s.dimensions
        full = s.read_region((0, 0), 0, (w, h))
        mpp = s.mpp
    rng = np.random.default_rng(seed)
    rows = ["slide,label,split"]
    for i in range(n):
        x0, y0 = int(rng.integers(0, w - 1024)), int(rng.integers(0, h - 1024))
        img = full[y0:y0 + 1024, x0:x0 + 1024].copy()
        if rng.random() < 0.5:
            img = img[:, ::-1].copy()
        tumour = i % 2 == 1
        if tumour:
            tissue = np.argwhere(img.min(-1) < 200)
            for _ in range(int(rng.integers(2, 5))):
                cy, cx = tissue[int(rng.integers(len(tissue)))] if len(tissue) else (512, 512)
                ys, xs = slice(max(0, cy - 48), cy + 48), slice(max(0, cx - 48), cx + 48)
                dots = rng.random(img[ys, xs].shape[:2]) < 0.3
                img[ys, xs][dots] = (80, 35, 130)
        split = "test" if i % 5 == 4 else "val" if i % 5 == 3 else "train"
        write_slide(folder / f"s{i:03d}.tiff", np.ascontiguousarray(img), mpp=mpp)
        rows.append(f"s{i:03d}.tiff,{'tumour' if tumour else 'normal'},{split}")
    (folder / "slides.csv").write_text("\n".join(rows) + "\n")
    return folder / "slides.csv"


def encoder_speed(n: int = 256, size: int = 112) -> dict[str, float]:
    from meddx.modalities.pathology.embeddings import StatsEncoder
    from meddx.models import build_network

    tiles = np.random.default_rng(0).integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    enc = StatsEncoder()
    t = time.perf_counter()
    enc(tiles)
    stats = n / (time.perf_counter() - t)
    net = build_network("resnet18", num_outputs=2, spec={"spatial_dims": 2, "in_channels": 3,
                                                          "size": size}).eval()
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    with torch.inference_mode():
        t = time.perf_counter()
        for i in range(0, n, 64):
            net(x[i:i + 64])
    return {"stats_tiles_per_s": round(stats, 1),
            "resnet18_tiles_per_s": round(n / (time.perf_counter() - t), 1), "tile_px": size}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slides", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from meddx.evaluation.evaluator import evaluate
    from meddx.modalities.loading import load_bundle
    from meddx.modalities.pathology.embeddings import load_bag
    from meddx.training import train

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        csv = make_slides(Path(tmp), args.slides, args.seed)
        cfg = {"name": "wsi-synthetic", "seed": args.seed,
               "task": {"kind": "binary", "class_names": ["normal", "tumour"],
                        "positive_class": "tumour"},
               "data": {"path": str(csv), "modality": "pathology", "calib_fraction": 0.2,
                        "options": {"tile_mpp": 1.0, "tile_size": 112, "min_tissue": 0.3}},
               "train": {"epochs": args.epochs, "batch_size": 4, "lr": 1e-3,
                         "precision": "32", "early_stopping_patience": None},
               "evaluation": {"bootstrap": 200}}
        t1 = time.perf_counter()
        bundle = load_bundle(cfg)
        embed_s = time.perf_counter() - t1
        t1 = time.perf_counter()
        load_bundle(cfg)
        cached_s = time.perf_counter() - t1
        package = train(cfg, out=Path(tmp) / "run", progress=False, bundle=bundle)
        res = evaluate(package, bundle=bundle, bootstrap=200, report=False, explain=False)
        auroc = res.metrics["auroc"]

        def pooled(split: str) -> tuple[np.ndarray, np.ndarray]:
            s = bundle.splits[split]
            x = np.stack([load_bag(r.cache).features.mean(0).numpy() for r in s.inputs])
            return x, bundle.task.target_index(s.targets) == bundle.task.positive_index

        xtr, ytr = pooled("train")
        xte, yte = pooled("test")
        lr = LogisticRegression(max_iter=2000, C=1.0).fit(xtr, ytr)
        base = roc_auc_score(yte, lr.predict_proba(xte)[:, 1])
        out = {
            "data": "synthetic: random 1024 px crops of CMU-1-Small-Region.svs, planted "
                    "purple-dot squares in tumour slides (no labelled slides are staged)",
            "slides": args.slides, "test_slides": res.n, "cpu": _cpu(), "threads": 1,
            "abmil_test_auroc": auroc, "mean_pool_logistic_test_auroc": round(float(base), 4),
            "tiles_per_slide": bundle.info["tiles_per_slide"],
            "embed_all_slides_s": round(embed_s, 1), "reload_from_cache_s": round(cached_s, 2),
            "encoder_speed": encoder_speed(), "stain_normalisation": "not measured",
            "make_slides_s": round(t1 - t0, 1),
        }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "wsi_models.json").write_text(json.dumps(out, indent=2, default=float))
    md = ["# wsi_models (synthetic slides with planted labels)", "",
          f"CPU: {out['cpu']}, 1 thread. {out['data']}.", "",
          "| model (same cached bags, stats encoder) | test AUROC |", "|---|---:|",
          f"| ABMIL (gated attention) | {auroc.get('value', float('nan')):.3f} "
          f"[{auroc.get('low', float('nan')):.3f}, {auroc.get('high', float('nan')):.3f}] |",
          f"| mean pooling + logistic regression (baseline) | {base:.3f} |", "",
          f"Embedding {args.slides} slides: {out['embed_all_slides_s']} s; loading them again "
          f"from the cache: {out['reload_from_cache_s']} s.", "",
          f"Encoder throughput at {out['encoder_speed']['tile_px']} px: stats "
          f"{out['encoder_speed']['stats_tiles_per_s']} tiles/s, resnet18 forward "
          f"{out['encoder_speed']['resnet18_tiles_per_s']} tiles/s.", "",
          "Stain normalisation: not measured."]
    (RESULTS / "wsi_models.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
