"""ISIC 2017 part 3 (dermoscopy): the challenge's own metrics, measured against dermatologists.

For each arm and seed: train `configs/isic2017.yaml` (from scratch, 2 CPU threads; a package
already in the work folder is reused), then read the challenge test split (600 images) ONCE
per model: melanoma-vs-rest AUC, seborrheic-keratosis-vs-rest AUC, their mean (the
challenge's ranking figure), each with a DeLong 95% CI, and the 3-class accuracy. The
melanoma operating point is fitted on calib at the dermatologists' specificity (59%, Marchetti
et al. 2018) and its test sensitivity/specificity are reported with Wilson intervals beside the
dermatologists' 82% / 59% and ROC area 0.71.

Arms (side by side; each with its seeds):
  base      the shipped recipe (128 px, ResNet-18)
  tta       base + test-time flips (`meddx ensemble PKG --tta flips`, post-hoc refit on calib)
  ensemble  the seeds' mean logits (one package, `meddx ensemble … --no-post-hoc`: members
            carve different calib sets), with and without TTA; inference cost beside the gain
  fusion    late fusion of the image model's log-odds with age and sex (missing → indicator),
            logistic regression fitted on calib, compared with image-only on val — the only
            held-out split with age/sex (the bundled test split has none) — by DeLong's test
  r64/r224  the recipe at 64 / 224 px (resolution vs training time)
  ssl       fine-tuned from self-supervised init weights (`meddx pretrain`, --init-weights)
  cv        image + metadata: K-fold CV over train+val (the images with age and sex), one
            package per fold with `side_inputs: [age, sex]`, image-only vs fused on the same
            folds (benchmarks/isic2017_metadata.py; reduced recipe: --cv-size, --cv-epochs)

    python benchmarks/isic2017.py [--arms base tta ensemble fusion r64] [--seeds 0 1 2]
                                  [--workdir ~/.cache/meddx/bench/isic] [--threads 2]
                                  [--init-weights FILE] [--report]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import RESULTS, environment, mean_ci, write

CONFIG = Path(__file__).parents[1] / "configs" / "isic2017.yaml"
DERM_SENS, DERM_SPEC, DERM_AUC = 0.82, 0.59, 0.71  # Marchetti et al., JAAD 2018
TOP_MEAN_AUC = 0.91  # challenge winners, pretrained ensembles at full resolution
ARM_SIZE = {"base": None, "r64": 64, "r224": 224, "ssl": None}


def _cfg(arm: str, seed: int, threads: int, epochs: int | None, init: Path | None) -> Any:
    from meddx.config import load_config

    cfg = load_config(CONFIG).updated(**{"seed": seed, "train.threads": threads,
                                         "train.epochs": epochs, "data.size": ARM_SIZE[arm]})
    if arm == "ssl":
        cfg = cfg.updated(**{"model.init_weights": str(init)})
    return cfg


def _trained(arm: str, seed: int, args: argparse.Namespace) -> Any:
    from meddx.package import load_package
    from meddx.training import train

    folder = args.workdir / f"{arm}-s{seed}"
    if (folder / "model" / "manifest.json").is_file():
        return load_package(folder / "model")
    if arm == "ssl" and not args.init_weights:
        raise SystemExit("the ssl arm needs --init-weights (from `meddx pretrain`)")
    return train(_cfg(arm, seed, args.threads, args.epochs, args.init_weights), out=folder,
                 progress=False)


def _bundle(package: Any) -> Any:
    from meddx.config import ExperimentConfig
    from meddx.modalities.loading import load_bundle

    return load_bundle(ExperimentConfig.model_validate(package.card.training["config"]))


def _delong_ci(y: np.ndarray, s: np.ndarray) -> tuple[float, float, float]:
    from meddx.statistics.compare import delong_covariance

    aucs, cov = delong_covariance(y, s[None, :])
    half = 1.959964 * math.sqrt(max(float(cov[0, 0]), 0.0))
    return float(aucs[0]), max(0.0, float(aucs[0]) - half), min(1.0, float(aucs[0]) + half)


def _mean_auc_ci(y_mel: np.ndarray, s_mel: np.ndarray, y_sk: np.ndarray,
                 s_sk: np.ndarray, n_boot: int = 2000) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of the two AUCs (cases resampled jointly)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    n, out = len(y_mel), []
    for _ in range(n_boot):
        i = rng.integers(0, n, n)
        if y_mel[i].min() == y_mel[i].max() or y_sk[i].min() == y_sk[i].max():
            continue
        out.append((roc_auc_score(y_mel[i], s_mel[i]) + roc_auc_score(y_sk[i], s_sk[i])) / 2)
    return float(np.percentile(out, 2.5)), float(np.percentile(out, 97.5))


def _wilson(k: int, n: int) -> tuple[float, float]:
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def _classes(task: Any) -> tuple[int, int]:
    names = [c.lower() for c in task.class_names]
    mel = next(i for i, c in enumerate(names) if "melanoma" in c)
    sk = next(i for i, c in enumerate(names) if "seborrheic" in c or "keratosis" in c)
    return mel, sk


def _probs(package_path: Path, split: Any, threads: int) -> tuple[np.ndarray, float]:
    """Probabilities (temperature applied when the card has one) and seconds per image."""
    from meddx.inference import load_model
    from meddx.statistics.calibration import apply_temperature

    torch.set_num_threads(threads)
    predictor = load_model(package_path, backend="torch")
    start = time.perf_counter()
    logits, _ = predictor.predict_split(split, batch_size=64)
    per_image = (time.perf_counter() - start) / len(split)
    cal = predictor.card.calibration
    probs = (apply_temperature(predictor.task, logits, cal.temperature) if cal else
             predictor.task.probabilities(torch.from_numpy(logits)).numpy())
    return probs, per_image


def score(probs: np.ndarray, split: Any, task: Any) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score

    mel, sk = _classes(task)
    y = task.target_index(split.targets)
    ym, ys = (y == mel).astype(int), (y == sk).astype(int)
    m = _delong_ci(ym, probs[:, mel])
    s = _delong_ci(ys, probs[:, sk])
    lo, hi = _mean_auc_ci(ym, probs[:, mel], ys, probs[:, sk])
    return {"mel_auc": m[0], "mel_ci": [m[1], m[2]], "sk_auc": s[0], "sk_ci": [s[1], s[2]],
            "mean_auc": (m[0] + s[0]) / 2, "mean_ci": [lo, hi],
            "acc": float(accuracy_score(y, probs.argmax(1))), "n": len(y)}


def operating_point(calib_probs: np.ndarray, calib: Any, test_probs: np.ndarray, test: Any,
                    task: Any) -> dict[str, Any]:
    """Melanoma threshold fitted on calib at the dermatologists' specificity; test figures."""
    from meddx.statistics.operating_points import ThresholdSelector

    mel, _ = _classes(task)
    yc = (task.target_index(calib.targets) == mel).astype(int)
    sel = ThresholdSelector("specificity", DERM_SPEC).fit(yc, calib_probs[:, mel])
    yt = (task.target_index(test.targets) == mel).astype(int)
    flag = test_probs[:, mel] >= sel.threshold_
    tp, pos = int((flag & (yt == 1)).sum()), int(yt.sum())
    tn, neg = int((~flag & (yt == 0)).sum()), int((yt == 0).sum())
    return {"threshold": float(sel.threshold_), "sensitivity": tp / pos,
            "sensitivity_ci": list(_wilson(tp, pos)), "specificity": tn / neg,
            "specificity_ci": list(_wilson(tn, neg)), "positives": pos, "negatives": neg}


def _design(probs: np.ndarray, meta: Any, task: Any) -> np.ndarray:
    """Image log-odds (melanoma, SK) + age (standardised at 50 ± 20 years, 0 when missing)
    + missing-age flag + sex one-hot with an explicit 'unknown' column."""
    mel, sk = _classes(task)
    p = np.clip(probs, 1e-6, 1 - 1e-6)
    lo = np.log(p[:, [mel, sk]] / (1 - p[:, [mel, sk]]))
    import pandas as pd

    age = (pd.to_numeric(meta["age"], errors="coerce").to_numpy(dtype=float) if "age" in meta
           else np.full(len(p), np.nan))
    sex = meta["sex"].astype(str).str.lower().to_numpy() if "sex" in meta else \
        np.array(["unknown"] * len(p))
    missing = np.isnan(age)
    return np.column_stack([lo, np.where(missing, 0.0, (age - 50) / 20), missing,
                            sex == "male", sex == "female", ~np.isin(sex, ["male", "female"])])


def fusion(calib_probs: np.ndarray, calib: Any, val_probs: np.ndarray, val: Any,
           task: Any) -> dict[str, Any]:
    """Late fusion fitted on calib, scored on val beside image-only (DeLong per task)."""
    from sklearn.linear_model import LogisticRegression

    from meddx.statistics.compare import delong_test

    if calib.metadata is None or val.metadata is None:
        raise SystemExit("fusion needs age/sex metadata on calib and val")
    xc, xv = _design(calib_probs, calib.metadata, task), _design(val_probs, val.metadata, task)
    out: dict[str, Any] = {"fit_on": "calib", "scored_on": "val", "n_val": len(val),
                           "val_age_missing": int(xv[:, 3].sum()),
                           "val_sex_unknown": int(xv[:, 6].sum())}
    for name, k in zip(("melanoma", "seborrheic_keratosis"), _classes(task), strict=True):
        yc = (task.target_index(calib.targets) == k).astype(int)
        yv = (task.target_index(val.targets) == k).astype(int)
        lr = LogisticRegression(C=1.0, max_iter=1000).fit(xc, yc)
        fused = lr.predict_proba(xv)[:, 1]
        t = delong_test(yv, fused, val_probs[:, k])
        out[name] = {"fused_auc": t["auroc_a"], "image_auc": t["auroc_b"],
                     "difference": t["difference"], "ci": [t["low"], t["high"]],
                     "p_value": t["p_value"],
                     "coefficients": dict(zip(["logodds_mel", "logodds_sk", "age", "age_missing",
                                               "male", "female", "sex_unknown"],
                                              np.round(lr.coef_[0], 3).tolist(), strict=True))}
    return out


def run_seed(arm: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from meddx.training.combine import join_packages

    base_arm = "base" if arm in ("tta", "fusion") else arm
    package = _trained(base_arm, seed, args)
    bundle = _bundle(package)
    task = bundle.task
    path = package.path
    if arm == "tta":
        folder = args.workdir / f"tta-s{seed}"
        if not (folder / "manifest.json").is_file():
            join_packages([package.path], folder, tta="flips")
        path = folder
    test, calib, val = bundle.splits["test"], bundle.splits["calib"], bundle.splits["val"]
    test_probs, per_image = _probs(path, test, args.threads)
    calib_probs, _ = _probs(path, calib, args.threads)
    t = package.card.training
    row: dict[str, Any] = {"arm": arm, "seed": seed, "size": package.card.preprocessing.get("size"),
                           **score(test_probs, test, task),
                           "op": operating_point(calib_probs, calib, test_probs, test, task),
                           "val_auroc": t.get("best_score"), "best_epoch": t.get("best_epoch"),
                           "epochs_run": t.get("epochs_run"), "train_wall_s": t.get("wall_time_s"),
                           "ms_per_image": round(per_image * 1000, 2)}
    if arm == "fusion":
        val_probs, _ = _probs(path, val, args.threads)
        row["fusion"] = fusion(calib_probs, calib, val_probs, val, task)
    return row


def run_ensemble(args: argparse.Namespace, tta: str) -> dict[str, Any]:
    from meddx.training.combine import join_packages

    members = [_trained("base", s, args) for s in args.seeds]
    folder = args.workdir / f"ensemble-{tta}-{'-'.join(map(str, args.seeds))}"
    if not (folder / "manifest.json").is_file():
        join_packages([m.path for m in members], folder, tta=tta, post_hoc=False)
    bundle = _bundle(members[0])
    test = bundle.splits["test"]
    probs, per_image = _probs(folder, test, args.threads)
    return {"arm": "ensemble" + ("+tta" if tta != "none" else ""), "seed": args.seeds,
            **score(probs, test, bundle.task), "members": len(members),
            "train_wall_s": round(sum(m.card.training.get("wall_time_s") or 0
                                      for m in members), 1),
            "ms_per_image": round(per_image * 1000, 2)}


def report(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    fmt = lambda v, ci: f"{v:.3f} ({ci[0]:.3f}–{ci[1]:.3f})"  # noqa: E731
    md = ["# ISIC 2017 (dermoscopy): challenge metrics, from scratch on a CPU", "",
          f"Challenge test split (600 images: 117 melanoma, 90 seborrheic keratosis), read once "
          f"per model; model selection on val, post-hoc fits on calib (carved from train). "
          f"{env['cpu']}, {env['cores']} cores, torch {env['torch']}, {env['date']}, commit "
          f"{env['commit']}. Trained from scratch (no ImageNet weights); recipe "
          "`configs/isic2017.yaml`. CIs: DeLong for each AUC, bootstrap (2,000, cases "
          "resampled) for the mean; over seeds: mean and 95% t-interval.", "",
          f"References: challenge winners' mean AUC ≈ {TOP_MEAN_AUC} (ImageNet-pretrained "
          f"ensembles, full resolution); dermatologists (Marchetti et al. 2018) ROC area "
          f"{DERM_AUC} on melanoma, sensitivity {DERM_SENS:.0%} at specificity {DERM_SPEC:.0%}.",
          "", "## Summary over seeds", "",
          "| arm | seeds | melanoma AUC | SK AUC | mean AUC | ACC | train min / model | "
          "ms / image |", "|---|---|---|---|---|---|---|---|"]
    arms: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        arms.setdefault(r["arm"], []).append(r)
    summary = {}
    for arm, rs in arms.items():
        if "fusion" in rs[0] or "cv" in rs[0] or isinstance(rs[0]["seed"], list):
            continue
        s = {k: mean_ci([r[k] for r in rs]) for k in ("mel_auc", "sk_auc", "mean_auc", "acc")}
        summary[arm] = s
        cell = lambda d: (f"{d['mean']:.3f} ({d['ci95'][0]:.3f}–{d['ci95'][1]:.3f})"  # noqa: E731
                          if "ci95" in d else f"{d['mean']:.3f}")
        walls = [r["train_wall_s"] for r in rs if r.get("train_wall_s")]
        md.append(f"| {arm} | {len(rs)} | {cell(s['mel_auc'])} | {cell(s['sk_auc'])} | "
                  f"**{cell(s['mean_auc'])}** | {cell(s['acc'])} | "
                  f"{np.mean(walls) / 60 if walls else float('nan'):.1f} | "
                  f"{np.mean([r['ms_per_image'] for r in rs]):.1f} |")
    md += ["", "## Per model (test split; AUC with DeLong 95% CI)", "",
           "| arm | seed | size | melanoma AUC | SK AUC | mean AUC (bootstrap CI) | ACC | "
           "val AUROC | epochs (best) | train s | ms / image |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "mel_auc" not in r or "fusion" in r:  # fusion rows repeat their base model
            continue
        va = r.get("val_auroc")
        md.append(f"| {r['arm']} | {r['seed']} | {r.get('size', '')} | "
                  f"{fmt(r['mel_auc'], r['mel_ci'])} | {fmt(r['sk_auc'], r['sk_ci'])} | "
                  f"{fmt(r['mean_auc'], r['mean_ci'])} | {r['acc']:.3f} | "
                  f"{'' if va is None else f'{va:.3f}'} | {r.get('epochs_run', '')} "
                  f"({r.get('best_epoch', '')}) | {r.get('train_wall_s', '')} | "
                  f"{r['ms_per_image']} |")
    ops = [r for r in rows if "op" in r and "fusion" not in r]
    if ops:
        md += ["", "## Melanoma at the dermatologists' specificity", "",
               f"Threshold fitted on calib for specificity ≥ {DERM_SPEC:.0%} (melanoma vs rest); "
               f"test sensitivity and specificity with Wilson 95% intervals. Dermatologists: "
               f"sensitivity {DERM_SENS:.0%}, specificity {DERM_SPEC:.0%}, ROC area {DERM_AUC}.",
               "", "| arm | seed | melanoma AUC vs 0.71 | sensitivity | specificity | "
               "threshold |", "|---|---|---|---|---|---|"]
        for r in ops:
            o = r["op"]
            above = "above" if r["mel_ci"][0] > DERM_AUC else (
                "below" if r["mel_ci"][1] < DERM_AUC else "CI includes")
            md.append(f"| {r['arm']} | {r['seed']} | {fmt(r['mel_auc'], r['mel_ci'])} "
                      f"({above}) | {fmt(o['sensitivity'], o['sensitivity_ci'])} | "
                      f"{fmt(o['specificity'], o['specificity_ci'])} | {o['threshold']:.3f} |")
    fus = [r for r in rows if "fusion" in r]
    if fus:
        md += ["", "## Metadata fusion (age, sex) vs image only", "",
               "Logistic regression on the image model's log-odds + age (missing → 0 and a "
               "flag) + sex (male / female / unknown) fitted on calib; scored on val (150 "
               "cases; the only held-out split with metadata — the bundled test split has none; "
               "val also chose the epoch, equally for both arms). DeLong test, paired.", "",
               "| seed | task | image AUC | fused AUC | difference (95% CI) | p |",
               "|---|---|---|---|---|---|"]
        for r in fus:
            for task in ("melanoma", "seborrheic_keratosis"):
                f = r["fusion"][task]
                md.append(f"| {r['seed']} | {task} | {f['image_auc']:.3f} | "
                          f"{f['fused_auc']:.3f} | {f['difference']:+.3f} "
                          f"({f['ci'][0]:+.3f} to {f['ci'][1]:+.3f}) | {f['p_value']:.3f} |")
    cv = [r for r in rows if "cv" in r]
    if cv:
        from isic2017_metadata import cv_section

        md += cv_section(cv, (DERM_SENS, DERM_SPEC, DERM_AUC))
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="+", default=["base", "tta", "ensemble", "fusion"],
                    choices=["base", "tta", "ensemble", "fusion", "r64", "r224", "ssl", "cv"])
    ap.add_argument("--cv-folds", type=int, default=5, help="cv arm: folds")
    ap.add_argument("--cv-size", type=int, default=64, help="cv arm: image size (px)")
    ap.add_argument("--cv-epochs", type=int, default=12, help="cv arm: epochs per fold")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache/meddx/bench/isic")
    ap.add_argument("--init-weights", type=Path, default=None)
    ap.add_argument("--name", default="isic2017", help="results file stem")
    ap.add_argument("--report", action="store_true",
                    help="also write the HTML evaluation report of the base+TTA model with the "
                         "best val AUROC to results/<name>-report/")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    partial = RESULTS / f"{args.name}.partial.jsonl"
    done = {}
    if partial.is_file():
        for line in partial.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[(r["arm"], json.dumps(r["seed"]))] = r
    for arm in args.arms:
        jobs = ([("ensemble", args.seeds, "none"), ("ensemble+tta", args.seeds, "flips")]
                if arm == "ensemble" else [("cv", 0, None)] if arm == "cv"
                else [(arm, s, None) for s in args.seeds])
        for label, seed, tta in jobs:
            key = (label, json.dumps(seed))
            if key in done:
                continue
            if arm == "cv":
                from isic2017_metadata import run_cv

                args.derm_spec = DERM_SPEC
                r = run_cv(args, _wilson, _delong_ci)
            else:
                r = run_ensemble(args, tta) if arm == "ensemble" else run_seed(arm, seed, args)
            done[key] = r
            with partial.open("a") as f:
                f.write(json.dumps(r) + "\n")
            print(json.dumps({k: v for k, v in r.items() if k != "fusion"}), flush=True)
            write(args.name, {"environment": environment(), "runs": list(done.values())},
                  report(list(done.values()), environment()))
    if args.report:
        from meddx.evaluation import evaluate

        best = max((s for s in args.seeds), key=lambda s: _trained("base", s, args)
                   .card.training.get("best_score") or 0)
        folder = args.workdir / f"tta-s{best}"
        out = RESULTS / f"{args.name}-report"
        evaluate(folder, split="test", out=out, bootstrap=1000)
        print(f"report of seed {best} (+TTA): {out / 'report.html'}")
    write(args.name, {"environment": environment(), "runs": list(done.values())},
          report(list(done.values()), environment()))


if __name__ == "__main__":
    main()
