"""SimCLR pretraining on the training images, then fine-tuning, vs training from scratch.

One `meddx.training.pretrain.pretrain` run on the config's images (default BreastMNIST,
configs/breastmnist.yaml: resnet18 at 28 px; splits train + calib, i.e. all of the dataset's
training images, labels unused; val and test untouched), then for each seed two
`meddx.training.train` runs of the same recipe with the same epochs: from scratch, and with
``model.init_weights`` = the pretrained backbone. The test split is read once per run (AUC and
ACC as MedMNIST v2 computes them, see benchmarks/medmnist.py). Mean and 95% t-interval over
seeds go to results/<name>.{json,md} ($MEDDX_BENCH_RESULTS for smoke runs).

    nice -n 10 python benchmarks/pretrain.py [--config configs/breastmnist.yaml] [--size N]
        [--pretrain-epochs 30] [--finetune-epochs 15] [--seeds 0 1 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import environment, mean_ci, write
from medmnist import test_metrics

ROOT = Path(__file__).parents[1]


def finetune(cfg, arm: str, seed: int, weights: Path | None, workdir: Path) -> dict:
    from meddx.inference import load_model
    from meddx.training import load_bundle, train

    cfg = cfg.updated(**{"seed": seed,
                         "model.init_weights": str(weights) if weights else None})
    start = time.perf_counter()
    package = train(cfg, out=workdir / f"{arm}-s{seed}", progress=False, post_hoc=False)
    wall = time.perf_counter() - start
    metrics = test_metrics(load_model(package.path, backend="torch"), load_bundle(cfg))
    t = package.card.training
    return {"arm": arm, "seed": seed, **metrics, "val_auc": t.get("best_score"),
            "best_epoch": t.get("best_epoch"), "epochs_run": t.get("epochs_run"),
            "train_wall_s": round(wall, 1)}


def main() -> None:
    from meddx.config import load_config
    from meddx.models.combine import plain_options
    from meddx.training.pretrain import pretrain

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "breastmnist.yaml")
    ap.add_argument("--size", type=int, default=None, help="image size (default: the config's)")
    ap.add_argument("--pretrain-epochs", type=int, default=30)
    ap.add_argument("--pretrain-batch", type=int, default=64)
    ap.add_argument("--pretrain-lr", type=float, default=1e-3)
    ap.add_argument("--splits", nargs="+", default=["train", "calib"])
    ap.add_argument("--finetune-epochs", type=int, default=15)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--name", default="pretrain", help="results file stem")
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="meddx-pretrain-"))
    cfg = load_config(args.config)
    # single networks on both arms: the recipe's ensemble / TTA options are measured elsewhere
    plain = plain_options(cfg.model.options)
    cfg = cfg.updated(**{
        "data.size": args.size, "train.epochs": args.finetune_epochs,
        "train.threads": args.threads, "model.options": plain})
    weights = workdir / f"{cfg.name}.safetensors"
    report = pretrain(cfg, out=weights, splits=args.splits, epochs=args.pretrain_epochs,
                      batch_size=args.pretrain_batch, lr=args.pretrain_lr,
                      threads=args.threads, progress=False, seed=0)
    pre = {**report.metadata, "epoch_losses": [round(x, 4) for x in report.epoch_losses]}
    print(json.dumps({k: pre[k] for k in ("n_images", "first_loss", "final_loss", "seconds")}),
          flush=True)
    runs: list[dict] = []
    for seed in args.seeds:
        for arm, w in (("scratch", None), ("pretrained", weights)):
            r = finetune(cfg, arm, seed, w, workdir)
            runs.append(r)
            print(json.dumps(r), flush=True)
            # rewritten after every run so an interrupted benchmark still leaves its figures
            data = {"environment": environment(), "args": _jsonable(vars(args)),
                    "pretrain": pre, "runs": runs, "summary": summary(runs)}
            write(args.name, data, report_md(data))


def _jsonable(d: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def summary(runs: list[dict]) -> dict:
    out = {}
    for arm in ("scratch", "pretrained"):
        rs = [r for r in runs if r["arm"] == arm]
        if rs:
            out[arm] = {"auc": mean_ci([r["auc"] for r in rs], "seeds"),
                        "acc": mean_ci([r["acc"] for r in rs], "seeds"),
                        "train_wall_s": round(sum(r["train_wall_s"] for r in rs) / len(rs), 1)}
    pairs = [(a["auc"], b["auc"]) for a in runs if a["arm"] == "pretrained"
             for b in runs if b["arm"] == "scratch" and b["seed"] == a["seed"]]
    if pairs:
        out["auc_difference_pretrained_minus_scratch"] = mean_ci([a - b for a, b in pairs],
                                                                 "seeds")
    return out


def _fmt(s: dict) -> str:
    ci = s.get("ci95")
    return f"{s['mean']:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")


def report_md(data: dict) -> str:
    env, pre, args, summ = data["environment"], data["pretrain"], data["args"], data["summary"]
    md = [f"# SimCLR pretraining → fine-tuning vs from scratch ({pre['dataset']})", "",
          f"{env['cpu']}, {pre['threads']} thread per run on 2 cores shared with other jobs "
          f"(wall times are inflated by them), torch {env['torch']}, {env['date']}, "
          f"commit {env['commit']}.", "",
          f"**Pretraining**: {pre['network']} at {pre['input_spec'].get('size')} px, SimCLR "
          f"(NT-Xent, temperature {pre['temperature']}, batch {pre['batch_size']}, AdamW lr "
          f"{pre['lr']}, cosine) on the {pre['n_images']} images of splits "
          f"{' + '.join(pre['splits'])} (labels unused; val and test untouched), "
          f"{pre['epochs_run']} epochs: loss {pre['first_loss']:.3f} → {pre['final_loss']:.3f}, "
          f"{pre['seconds'] / 60:.1f} min.", "",
          f"**Fine-tuning**: the recipe {Path(args['config']).name} with "
          f"{args['finetune_epochs']} epochs (both arms alike; model chosen on val), seeds "
          f"{args['seeds']}, test split read once per run. Mean and 95% t-interval over seeds.",
          "", "| arm | test AUC | test ACC | fine-tune wall time / seed |", "|---|---|---|---|"]
    for arm in ("scratch", "pretrained"):
        if arm in summ:
            s = summ[arm]
            md.append(f"| {arm} | {_fmt(s['auc'])} | {_fmt(s['acc'])} | "
                      f"{s['train_wall_s'] / 60:.1f} min |")
    if "auc_difference_pretrained_minus_scratch" in summ:
        md += ["", "Paired AUC difference (pretrained − scratch, same seed): "
               + _fmt(summ["auc_difference_pretrained_minus_scratch"]) + "."]
    md += ["", "Per run:", "", "| arm | seed | test AUC | test ACC | val AUC | best epoch | "
           "epochs run | wall s |", "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['arm']} | {r['seed']} | {r['auc']:.3f} | {r['acc']:.3f} | "
           f"{(r['val_auc'] or float('nan')):.3f} | {r['best_epoch']} | {r['epochs_run']} | "
           f"{r['train_wall_s']} |" for r in data["runs"]]
    md += ["", "Pretraining loss per epoch: "
           + ", ".join(f"{x:.3f}" for x in pre["epoch_losses"]) + "."]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
