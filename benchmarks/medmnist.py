"""MedMNIST v2 benchmark: train the default configs over several seeds, test once per seed.

For each dataset (breastmnist, retinamnist, adrenalmnist3d) and seed: `meddx.train` on the
config in configs/ (model chosen on the validation split only), then ONE pass over the test
split for AUC and ACC computed as MedMNIST v2 does (AUC: binary on the positive class, else
macro one-vs-rest; ACC: argmax). Mean and 95% t-interval over seeds are written beside the
published rows (../shared/reference/medmnist_v2_benchmark.md) to results/medmnist.{json,md}.

    python benchmarks/medmnist.py [--datasets breastmnist retinamnist adrenalmnist3d]
                                  [--seeds 0 1 2] [--epochs N] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _common import RESULTS, environment, write
from scipy import stats
from sklearn.metrics import accuracy_score, roc_auc_score

CONFIGS = Path(__file__).parents[1] / "configs"
PUBLISHED = {  # test AUC / ACC, Yang et al. 2023 (MedMNIST v2 table)
    "breastmnist": {"ResNet-18 (28)": (0.901, 0.863), "Google AutoML Vision": (0.919, 0.861)},
    "retinamnist": {"ResNet-18 (28)": (0.717, 0.524), "Google AutoML Vision": (0.750, 0.531)},
    "adrenalmnist3d": {"ResNet-18 + 3D": (0.827, 0.721), "ResNet-50 + 3D": (0.828, 0.745)},
}


def test_metrics(predictor, bundle) -> dict[str, float]:
    logits, _ = predictor.predict_split(bundle.splits["test"])
    return metrics_from_logits(bundle, logits)


def interval(values: list[float]) -> tuple[float, float, float]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def run_one(name: str, seed: int, epochs: int | None, threads: int, workdir: Path) -> dict:
    """Train (or reuse ``workdir/<name>-s<seed>``) and read the test split once. For an
    ensemble recipe the members' own test scores (single networks, no TTA) and the plain
    ensemble (mean logits, no TTA) are read too, from the same run, with inference time."""
    import numpy as np
    import torch

    from meddx.config import load_config
    from meddx.inference import load_model
    from meddx.package import load_package
    from meddx.training import load_bundle, train

    cfg = load_config(CONFIGS / f"{name}.yaml").updated(
        **{"seed": seed, "train.epochs": epochs, "train.threads": threads})
    torch.set_num_threads(threads)
    run = workdir / f"{name}-s{seed}"
    if (run / "model" / "manifest.json").is_file():
        package = load_package(run / "model")
        wall = package.card.training.get("wall_time_s")
    else:
        start = time.perf_counter()
        package = train(cfg, out=run, progress=False, post_hoc=False)
        wall = time.perf_counter() - start
    bundle = load_bundle(cfg)
    shipped = load_model(package.path, backend="torch")
    start = time.perf_counter()
    metrics = test_metrics(shipped, bundle)
    ms = (time.perf_counter() - start) * 1000 / len(bundle.splits["test"])
    t = package.card.training
    out = {"dataset": name, "seed": seed, **metrics, "val_auc": t.get("best_score"),
           "best_epoch": t.get("best_epoch"), "epochs_run": t.get("epochs_run"),
           "train_wall_s": round(wall, 1), "ms_per_image": round(ms, 3),
           "options": package.card.network.get("options", {})}
    members = sorted((run / "members").glob("*/model/manifest.json"))
    if members:
        singles, logits = [], []
        for m in members:
            p = load_model(m.parent, backend="torch")
            start = time.perf_counter()
            z, _ = p.predict_split(bundle.splits["test"])
            single_ms = (time.perf_counter() - start) * 1000 / len(z)
            logits.append(z)
            singles.append({**metrics_from_logits(bundle, z), "seed": p.card.training.get("seed"),
                            "ms_per_image": round(single_ms, 3),
                            "epochs_run": p.card.training.get("epochs_run")})
        out["members"] = singles
        out["ensemble_no_tta"] = metrics_from_logits(bundle, np.mean(logits, axis=0))
    return out


def metrics_from_logits(bundle, logits) -> dict[str, float]:
    """Test AUC and ACC as MedMNIST v2 computes them (AUC: binary on the positive class, else
    macro one-vs-rest; ACC: argmax) from the test split's logits."""
    import torch

    task, split = bundle.task, bundle.splits["test"]
    probs = task.probabilities(torch.from_numpy(logits)).numpy()
    y = task.target_index(split.targets)
    if task.kind == "binary":
        auc = roc_auc_score(y == task.positive_index, probs[:, task.positive_index])
    else:
        auc = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    return {"auc": float(auc), "acc": float(accuracy_score(y, probs.argmax(1)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=list(PUBLISHED))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="override the configs' epochs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--name", default="medmnist", help="results file stem (parallel runs)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="STEM",
                    help="only rewrite results/medmnist.* from these runs' .partial.jsonl files")
    args = ap.parse_args()
    if args.merge:
        runs = [json.loads(line) for stem in args.merge
                for line in (RESULTS / f"{stem}.partial.jsonl").read_text().splitlines() if line]
        args.datasets = [d for d in PUBLISHED if any(r["dataset"] == d for r in runs)]
        args.seeds = sorted({r["seed"] for r in runs})
        args.sources = ("runs merged from " + ", ".join(f"results/{m}.md" for m in args.merge)
                        + " (threads, load and dates there)")
        write("medmnist", {"environment": environment(), "runs": runs}, report(runs, args))
        return
    workdir = args.workdir or Path.home() / ".cache" / "meddx" / "bench" / "medmnist"
    workdir.mkdir(parents=True, exist_ok=True)
    partial = RESULTS / f"{args.name}.partial.jsonl"
    runs = []
    for name in args.datasets:
        for seed in args.seeds:
            r = run_one(name, seed, args.epochs, args.threads, workdir)
            runs.append(r)
            with partial.open("a") as f:
                f.write(json.dumps(r) + "\n")
            print(json.dumps(r), flush=True)
            # rewrite after every run so an interrupted benchmark still leaves its figures
            write(args.name, {"environment": environment(), "runs": runs}, report(runs, args))


def _method(run: dict) -> str:
    """``resnet18``, or ``resnet18 ×3 + TTA flips`` for an ensemble recipe."""
    o = run.get("options") or {}
    label = "resnet18"
    if int(o.get("members", 1) or 1) > 1:
        label += f" ×{o['members']}"
    if o.get("tta") not in (None, "none"):
        label += f" + TTA {o['tta']}"
    return label


def report(runs: list[dict], args: argparse.Namespace) -> str:
    env = environment()
    threads = getattr(args, "sources", None) or f"{args.threads} threads per run"
    md = ["# MedMNIST v2: meddx recipes vs the published table", "",
          f"Test split, read once per seed; model selection on val only. Seeds {args.seeds}; "
          f"{env['cpu']}, {threads}, torch {env['torch']}, {env['date']}. "
          "Mean and 95% t-interval over seeds. The recipe is `configs/<dataset>.yaml`.", "",
          "| dataset | method | test AUC | test ACC | train wall time / seed |", "|---|---|---|---|---|"]
    for name in args.datasets:
        rs = [r for r in runs if r["dataset"] == name]
        if not rs:
            continue
        auc, acc = interval([r["auc"] for r in rs]), interval([r["acc"] for r in rs])
        wall = statistics.fmean(r["train_wall_s"] for r in rs)
        md.append(f"| {name} | **meddx {_method(rs[0])}** | **{auc[0]:.3f}** ({auc[1]:.3f}–{auc[2]:.3f}) | "
                  f"**{acc[0]:.3f}** ({acc[1]:.3f}–{acc[2]:.3f}) | {wall / 60:.1f} min |")
        for method, (a, c) in PUBLISHED[name].items():
            md.append(f"| {name} | {method} (published) | {a:.3f} | {c:.3f} | |")
    ens = [r for r in runs if r.get("members")]
    if ens:
        md += ["", "Shipped ensemble vs its own members (same runs; members are single networks "
               "without TTA, seeds seed..seed+2 on the ensemble's split):", "",
               "| dataset | arm | n | test AUC | test ACC | ms / image |", "|---|---|---|---|---|---|"]
        for name in args.datasets:
            rs = [r for r in ens if r["dataset"] == name]
            if not rs:
                continue
            singles = [m for r in rs for m in r["members"]]
            arms = [("single network (each member)", singles,
                     statistics.fmean(m["ms_per_image"] for m in singles)),
                    ("ensemble, no TTA", [r["ensemble_no_tta"] for r in rs], float("nan")),
                    ("ensemble + TTA (shipped)", rs,
                     statistics.fmean(r["ms_per_image"] for r in rs))]
            for label, xs, ms in arms:
                auc, acc = interval([x["auc"] for x in xs]), interval([x["acc"] for x in xs])
                md.append(f"| {name} | {label} | {len(xs)} | {auc[0]:.3f} ({auc[1]:.3f}–"
                          f"{auc[2]:.3f}) | {acc[0]:.3f} ({acc[1]:.3f}–{acc[2]:.3f}) | "
                          f"{'' if ms != ms else f'{ms:.2f}'} |")
    md += ["", "Per seed:", "", "| dataset | seed | test AUC | test ACC | val AUC | best epoch | "
           "epochs run | wall s |", "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['dataset']} | {r['seed']} | {r['auc']:.3f} | {r['acc']:.3f} | "
           f"{(r['val_auc'] or float('nan')):.3f} | {r['best_epoch']} | {r['epochs_run']} | "
           f"{r['train_wall_s']} |" for r in runs]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
