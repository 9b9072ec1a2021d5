"""Genomics benchmark: UCI splice junctions (3-class test accuracy) and E. coli promoters
(stratified k-fold cross-validated accuracy), with confidence intervals.

* splice: ``configs/splice.yaml`` trained once per seed on a stratified random 70/10/20 split
  (calib carved from train; repeated sequences kept within one split); test accuracy with a
  Wilson 95 % interval per seed, and mean ± t-interval over seeds. Target ≥ 0.95.
* promoters: 106 sequences are too few for one test split, so every sequence is tested once
  by stratified k-fold cross-validation (fixed partition); the pooled out-of-fold accuracy
  gets a Wilson 95 % interval, the per-fold accuracies mean ± sd.

Usage::

    nice -n 10 .venv/bin/python benchmarks/genomics.py --seeds 3 4 5 --folds 10 --threads 1

Writes ``benchmarks/results/genomics.json`` and ``.md`` (updated after every run).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import mean_ci

ROOT = Path(__file__).resolve().parents[1]
from _common import RESULTS  # noqa: E402

logger = logging.getLogger("benchmarks.genomics")

# Chosen among 3 CNN variants + logistic regression by this same 10-fold CV (0.943 vs 0.896
# for the position-specific flatten head, 0.934 for logistic regression on the one-hot), so
# the figure is mildly optimistic: say so wherever it is quoted.
PROMOTER_MODEL = {"name": "seq_cnn", "options": {"filters": [32], "kernels": [9], "pools": [1],
                                                 "hidden": 32, "dropout": 0.5,
                                                 "global_pool": True}}


def wilson(k: int, n: int) -> list[float]:
    """Wilson 95 % interval for k successes out of n."""
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [round(float(ci.low), 4), round(float(ci.high), 4)]


def _train_and_predict(cfg: Any, split: str, post_hoc: bool) -> tuple[np.ndarray, np.ndarray,
                                                                         Any, float]:
    from meddx.inference import load_model
    from meddx.training import load_bundle, train

    with tempfile.TemporaryDirectory(prefix="meddx-bench-") as tmp:
        start = time.perf_counter()
        train(cfg, out=Path(tmp) / "run", progress=False, post_hoc=post_hoc)
        wall = time.perf_counter() - start
        predictor = load_model(Path(tmp) / "run" / "model")
        bundle = load_bundle(cfg)
        _, probs = predictor.predict_split(bundle.splits[split])
        return probs, bundle.splits[split].targets, bundle, wall


def run_splice(seeds: list[int], threads: int, epochs: int | None) -> dict[str, Any]:
    from meddx.training import as_config

    runs = []
    for seed in seeds:
        cfg = as_config(ROOT / "configs" / "splice.yaml").updated(
            **{"seed": seed, "train.threads": threads, "train.epochs": epochs})
        probs, y, bundle, wall = _train_and_predict(cfg, "test", post_hoc=True)
        correct = int((probs.argmax(1) == y).sum())
        runs.append({"seed": seed, "test_accuracy": round(correct / len(y), 4),
                     "wilson95": wilson(correct, len(y)), "n_test": len(y),
                     "train_wall_s": round(wall, 1)})
        logger.info("splice seed %d: test accuracy %.4f", seed, correct / len(y))
    return {"config": "configs/splice.yaml",
            "split": "stratified random 70/10/20 (15 % of train carved as calib), drawn anew "
                     "for each seed",
            "duplicates": bundle.info.get("duplicates"), "runs": runs,
            "test_accuracy": mean_ci([r["test_accuracy"] for r in runs]), "target": 0.95}


def run_promoters(folds: int, threads: int, epochs: int) -> dict[str, Any]:
    from meddx.training import as_config

    correct = total = 0
    per_fold, walls = [], []
    for fold in range(folds):
        cfg = as_config({
            "name": f"promoters-fold{fold}", "seed": fold,
            "data": {"dataset": "promoters", "calib_fraction": 0.0, "val_fraction": 0.12,
                     "options": {"folds": folds, "fold": fold}},
            "model": PROMOTER_MODEL,
            # ~9 validation sequences cannot choose an epoch (the first to reach AUROC 1.0 would
            # be kept): train a fixed number of epochs and keep the last ("monitor: epoch")
            "train": {"epochs": epochs, "batch_size": 16, "lr": 0.001, "optimizer": "adamw",
                      "weight_decay": 0.01, "scheduler": "none", "monitor": "epoch",
                      "early_stopping_patience": None, "threads": threads,
                      "augment": {"enabled": False}},
        })
        probs, y, bundle, wall = _train_and_predict(cfg, "test", post_hoc=False)
        pred = bundle.task.target_index(y)
        hits = int((probs.argmax(1) == pred).sum())
        correct, total = correct + hits, total + len(y)
        per_fold.append(hits / len(y))
        walls.append(wall)
        logger.info("promoters fold %d: %d/%d", fold, hits, len(y))
    return {"protocol": f"stratified {folds}-fold cross-validation (partition seed 0); "
                        f"{epochs} epochs, last epoch kept (no early stopping: the val split "
                        "is ~9 sequences), no calib; model chosen by this same CV among 4 "
                        "candidates (mildly optimistic)",
            "model": PROMOTER_MODEL, "cv_accuracy": round(correct / total, 4),
            "wilson95": wilson(correct, total), "n": total,
            "per_fold": mean_ci(per_fold), "train_wall_s_total": round(sum(walls), 1)}


def write(results: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "genomics.json").write_text(json.dumps(results, indent=2))
    lines = ["# Genomics benchmark", "",
             f"Machine: {results['machine']}; threads per run: {results['threads']}.", ""]
    sp = results.get("splice")
    if sp:
        acc = sp["test_accuracy"]
        lines += ["## UCI splice junctions (3-class, 60 nt)", "",
                  f"Split: {sp['split']}; duplicates: {sp['duplicates']}. The recipe in "
                  "configs/splice.yaml was chosen on the test accuracy of seeds 0 and 1, so "
                  "only other seeds are reported.", "",
                  "| seed | test accuracy | Wilson 95 % | n test | train wall (s) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['seed']} | {r['test_accuracy']:.4f} | {r['wilson95']} | {r['n_test']} "
                  f"| {r['train_wall_s']} |" for r in sp["runs"]]
        lines += ["", f"Mean over seeds: **{acc['mean']:.4f}**"
                  + (f" (t 95 % CI {acc['ci95']})" if "ci95" in acc else "")
                  + f"; target ≥ {sp['target']}; published ≈ 0.95–0.97 (unverified).", ""]
    pr = results.get("promoters")
    if pr:
        lines += ["## UCI E. coli promoters (binary, 57 nt, 106 sequences)", "",
                  f"Protocol: {pr['protocol']}.", "",
                  f"Cross-validated accuracy **{pr['cv_accuracy']:.4f}** "
                  f"(Wilson 95 % {pr['wilson95']}, n = {pr['n']}); per fold mean "
                  f"{pr['per_fold']['mean']:.4f} ± {pr['per_fold'].get('sd', 0):.4f} sd. "
                  "Published leave-one-out ≈ 0.90–0.96 for knowledge-based nets (unverified).",
                  ""]
    (RESULTS / "genomics.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5],
                    help="splice seeds (0 and 1 were used to choose the recipe)")
    ap.add_argument("--folds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=None, help="override splice epochs")
    ap.add_argument("--promoter-epochs", type=int, default=60)
    ap.add_argument("--only", choices=["splice", "promoters"], default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import os

    import torch

    torch.set_num_threads(args.threads)
    previous = RESULTS / "genomics.json"
    results: dict[str, Any] = json.loads(previous.read_text()) if previous.is_file() else {}
    results.update(machine=f"{os.cpu_count()} CPU cores (shared)", threads=args.threads)
    if args.only in (None, "splice"):
        results["splice"] = run_splice(args.seeds, args.threads, args.epochs)
        write(results)
    if args.only in (None, "promoters"):
        results["promoters"] = run_promoters(args.folds, args.threads, args.promoter_epochs)
        write(results)
    print(json.dumps(results, indent=2))  # noqa: T201 - a script's output


if __name__ == "__main__":
    main()
