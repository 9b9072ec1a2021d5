"""Molecule benchmark: Tox21 mean ROC-AUC (12 assays) with random and scaffold splits, on
validation and test, against DeepChem's table; BBBP and ClinTox with the scaffold split.

Each run trains ``configs/tox21.yaml``'s recipe (Chemprop D-MPNN in meddx's Lightning loop,
80/10/10 split, calib 10 % carved from train) for one (dataset, split, seed). ROC-AUC is
computed per task on the samples whose label is present, then averaged over tasks. The
validation split also chose the epoch (early stopping), as in DeepChem's hyper-parameter
search, so validation figures are the like-for-like comparison with DeepChem's table
(GraphConv 0.832 random / 0.764 scaffold, both validation); test is reported beside it.

Runs go seed by seed (all datasets for seed 0 first), and results are written after every
run, so a partial benchmark is still a usable one. ``--resume`` skips finished runs.

Usage::

    nice -n 10 .venv/bin/python benchmarks/molecules.py --seeds 0 1 2 --threads 1 --resume
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import mean_ci

ROOT = Path(__file__).resolve().parents[1]
from _common import RESULTS  # noqa: E402

logger = logging.getLogger("benchmarks.molecules")

DEEPCHEM_VAL = {  # Tox21 mean ROC-AUC, validation (ANCHORS.md)
    "random": {"GraphConv": 0.832, "Weave": 0.812, "XGBoost (ECFP)": 0.773, "RF (ECFP)": 0.763,
               "logistic regression": 0.735},
    "scaffold": {"GraphConv": 0.764, "Weave": 0.763, "XGBoost (ECFP)": 0.703,
                 "RF (ECFP)": 0.665, "logistic regression": 0.676},
}
LEADERBOARD = {"clintox": "MoleculeNet GCN 0.9065 test ROC-AUC (its recommended random split)",
               "bbbp": "MoleculeNet RF 0.954 (as listed in ANCHORS.md)"}


def task_aucs(task: Any, targets: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """ROC-AUC per task on present labels (tasks with one class only are skipped)."""
    from sklearn.metrics import roc_auc_score

    if task.kind == "binary":
        y = task.target_index(targets) == task.positive_index
        return {task.positive_class: float(roc_auc_score(y, probs[:, task.positive_index]))}
    out = {}
    for j, name in enumerate(task.class_names):
        known = ~np.isnan(targets[:, j])
        yj = targets[known, j]
        if len(np.unique(yj)) == 2:
            out[name] = float(roc_auc_score(yj, probs[known, j]))
    return out


def one_run(dataset: str, split: str, seed: int, threads: int, epochs: int | None,
            model: str, dropout: float | None = None,
            settings: dict[str, Any] | None = None) -> dict[str, Any]:
    from meddx.inference import load_model
    from meddx.training import as_config, load_bundle, train

    overrides: dict[str, Any] = {"name": f"{dataset}-{split}-{seed}", "seed": seed,
                                 "data.dataset": dataset, "data.split": split,
                                 "train.threads": threads, "train.epochs": epochs}
    if model == "ecfp_mlp":
        overrides.update({"model.name": "ecfp_mlp", "model.options": {},
                          "data.options": {"featurizer": "ecfp"}})
    elif model == "dmpnn_rdkit":
        overrides["data.options"] = {"featurizer": "graph", "descriptors": "rdkit2d"}
    if dropout is not None:
        overrides["model.options.dropout"] = dropout
    overrides.update(settings or {})
    cfg = as_config(ROOT / "configs" / "tox21.yaml").updated(**overrides)
    with tempfile.TemporaryDirectory(prefix="meddx-bench-") as tmp:
        start = time.perf_counter()
        package = train(cfg, out=Path(tmp) / "run", progress=False, post_hoc=False)
        wall = time.perf_counter() - start
        predictor = load_model(package.path)
        bundle = load_bundle(cfg)
        out: dict[str, Any] = {"seed": seed, "train_wall_s": round(wall, 1),
                               "epochs_run": package.card.training.get("epochs_run"),
                               "best_epoch": package.card.training.get("best_epoch"),
                               "n": {k: len(s) for k, s in bundle.splits.items()},
                               "dropped": bundle.info.get("dropped", {}).get("count")}
        for name in ("val", "test"):
            _, probs = predictor.predict_split(bundle.splits[name])
            aucs = task_aucs(bundle.task, bundle.splits[name].targets, probs)
            out[f"{name}_mean_auc"] = round(float(np.mean(list(aucs.values()))), 4)
            out[f"{name}_auc_per_task"] = {k: round(v, 4) for k, v in aucs.items()}
    return out


def summary(values: list[float]) -> dict[str, Any]:
    """Mean over seeds with a t 95 % interval (``n_seeds`` runs)."""
    return mean_ci(values, count_key="n_seeds")


def write(results: dict[str, Any], name: str) -> None:
    for entry in results["runs"].values():
        for part in ("val", "test"):
            entry[f"{part}_summary"] = summary([r[f"{part}_mean_auc"] for r in entry["runs"]])
        entry["train_wall_s_mean"] = round(float(np.mean([r["train_wall_s"]
                                                          for r in entry["runs"]])), 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown(results))


def _fmt(s: dict[str, Any]) -> str:
    text = f"{s['mean']:.3f}"
    if "ci95" in s:
        text += f" ({s['ci95'][0]:.3f}–{s['ci95'][1]:.3f})"
    return text + f" [n={s['n_seeds']}]"


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Molecule benchmark", "",
             f"Recipe: {results['recipe']}. Machine: {results['machine']}; "
             f"{results['threads']} thread(s) per run. Mean ROC-AUC over tasks; mean over "
             "seeds with a t 95 % interval [number of seeds].", "",
             "| dataset | split | model | val mean AUC | test mean AUC | DeepChem / reference "
             "| train wall per run (s) |", "|---|---|---|---|---|---|---|"]
    for key, e in results["runs"].items():
        dataset, split, model = key.split("/")
        ref = ""
        if dataset == "tox21":
            dc = DEEPCHEM_VAL[split]
            ref = f"GraphConv {dc['GraphConv']} / Weave {dc['Weave']} (val)"
        else:
            ref = LEADERBOARD.get(dataset, "")
        lines.append(f"| {dataset} | {split} | {model} | {_fmt(e['val_summary'])} | "
                     f"{_fmt(e['test_summary'])} | {ref} | {e['train_wall_s_mean']} |")
    tox = {k: e for k, e in results["runs"].items() if k.startswith("tox21/")}
    if tox:
        lines += ["", "## Tox21 per assay (test ROC-AUC, mean over seeds)", ""]
        for key, e in tox.items():
            names = list(e["runs"][0]["test_auc_per_task"])
            means = {n: np.mean([r["test_auc_per_task"].get(n, np.nan) for r in e["runs"]])
                     for n in names}
            lines.append(f"- {key}: " + ", ".join(f"{n} {v:.3f}" for n, v in means.items()))
    lines += ["", "Notes: validation chose the epoch (early stopping), so validation figures "
              "are optimistic in the same way as DeepChem's hyper-parameter-searched ones; "
              "the scaffold split is deterministic, so its seeds vary only the initialisation. "
              "8 invalid Tox21 SMILES are dropped and reported.", ""]
    return "\n".join(lines)


def _recipe(model: str, epochs: int | None, dropout: float | None = None,
            settings: dict[str, Any] | None = None) -> str:
    agg = (settings or {}).get("model.options.aggregation", "mean")
    net = {"dmpnn": f"D-MPNN hidden 300, depth 3, {agg} aggregation",
           "dmpnn_rdkit": f"D-MPNN hidden 300, depth 3, {agg} aggregation + RDKit 2D descriptors",
           "ecfp_mlp": "ECFP4 (Morgan r=2, 2048 bits) + MLP 1024-256, dropout 0.3"}[model]
    text = (f"configs/tox21.yaml training recipe with {net}; 80/10/10 split; calib (10 % of the "
            "data) carved from train")
    return (text + (f"; epochs {epochs}" if epochs else "")
            + (f"; dropout {dropout}" if dropout is not None else "")
            + "".join(f"; {k} {v}" for k, v in (settings or {}).items()
                      if k != "model.options.aggregation"))


def _settings(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` dotted config overrides, values read as YAML (``train.lr=5e-4``)."""
    from meddx.config import parse_key_value

    return dict(parse_key_value(pair, "--set") for pair in pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", nargs="+", default=["tox21/random", "tox21/scaffold",
                                                  "bbbp/scaffold", "clintox/scaffold"],
                    help="dataset/split pairs")
    ap.add_argument("--model", default="dmpnn", choices=["dmpnn", "dmpnn_rdkit", "ecfp_mlp"],
                    help="dmpnn_rdkit: D-MPNN + RDKit 2D descriptors (data.options.descriptors)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=None, help="override configs/tox21.yaml")
    ap.add_argument("--dropout", type=float, default=None, help="override the model dropout")
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted config override, e.g. train.lr=5e-4 (repeatable)")
    ap.add_argument("--resume", action="store_true", help="skip runs already in the results")
    ap.add_argument("--results", default="molecules",
                    help="results file stem under benchmarks/results (one per concurrent run)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    out_json = RESULTS / f"{args.results}.json"
    results: dict[str, Any] = (json.loads(out_json.read_text()) if out_json.is_file()
                               else {"runs": {}})
    results.update(machine=f"{os.cpu_count()} CPU cores (shared with other work)",
                   threads=args.threads,
                   recipe=_recipe(args.model, args.epochs, args.dropout,
                                  _settings(args.settings)))
    for seed in args.seeds:
        for job in args.jobs:
            dataset, split = job.split("/")
            key = f"{dataset}/{split}/{args.model}"
            entry = results["runs"].setdefault(key, {"runs": []})
            if args.resume and any(r["seed"] == seed for r in entry["runs"]):
                continue
            run = one_run(dataset, split, seed, args.threads, args.epochs, args.model,
                          args.dropout, _settings(args.settings))
            entry["runs"] = [r for r in entry["runs"] if r["seed"] != seed] + [run]
            logger.info("%s seed %d: val %.4f test %.4f (%.0f s)", key, seed,
                        run["val_mean_auc"], run["test_mean_auc"], run["train_wall_s"])
            write(results, args.results)
    print(markdown(results))  # noqa: T201 - a script's output


if __name__ == "__main__":
    main()
