"""ISIC 2017 image + metadata: K-fold cross-validation over train+val, the only images with
age and sex (the bundled test split has none), image-only vs the package's side inputs.

For each fold: the held-out fold is the test split; of the rest, 10% (stratified) is val
(early stopping) and calib is carved from train as the recipe does. One package per fold is
trained with ``side_inputs: [age, sex]`` (late fusion on calib, :mod:`meddx.sideinputs`); the
same package gives the image-only figure (its network's logits, unfused) and the fused one, so
both arms share folds, network and weights. Out-of-fold melanoma probabilities (softmax, no
temperature) are pooled over folds: melanoma-vs-rest AUC with a DeLong 95% CI per arm, the
paired DeLong test of the difference, and sensitivity at the dermatologists' specificity (59%,
Marchetti et al. 2018) with the threshold fitted on each fold's calib split, pooled counts with
Wilson intervals. Used by ``benchmarks/isic2017.py --arms cv``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

MEL = "melanoma"


def _frame() -> Any:
    from meddx.catalog import data_roots
    from meddx.modalities.image.folder import _isic_frame  # the loader's own join of CSVs

    for root in data_roots():
        folder = root / "dermoscopy" / "isic2017"
        if (folder / "labels_derived.csv").is_file():
            frame = _isic_frame(folder)
            frame = frame[frame["split"].isin(["train", "val"])].reset_index(drop=True)
            frame["path"] = [str(folder / p) for p in frame["path"]]
            return frame
    raise SystemExit("ISIC 2017 not found under the data roots")


def _fold_csv(frame: Any, test_idx: np.ndarray, folder: Path, seed: int) -> Path:
    from sklearn.model_selection import train_test_split

    rest = np.setdiff1d(np.arange(len(frame)), test_idx)
    train_idx, val_idx = train_test_split(rest, test_size=0.1, random_state=seed,
                                          stratify=frame["label"].to_numpy()[rest])
    split = np.empty(len(frame), dtype=object)
    split[train_idx], split[val_idx], split[test_idx] = "train", "val", "test"
    out = frame.assign(split=split)
    folder.mkdir(parents=True, exist_ok=True)
    out.to_csv(folder / "labels.csv", index=False)
    return folder


def _config(folder: Path, args: argparse.Namespace) -> Any:
    from isic2017 import CONFIG

    from meddx.config import load_config
    from meddx.modalities.image.folder import ISIC2017_TASK

    cfg = load_config(CONFIG)
    raw = cfg.model_dump(mode="json")
    raw["data"] = {"path": str(folder), "modality": "image", "size": args.cv_size,
                   "calib_fraction": 0.15, "options": {"format": "folder"}}
    raw["task"] = ISIC2017_TASK.model_dump(mode="json")
    raw["side_inputs"] = ["age", "sex"]
    raw["train"].update(epochs=args.cv_epochs, threads=args.threads)
    raw["name"] = f"isic2017-cv{args.cv_size}"
    return cfg.model_validate(raw)


def _fold(k: int, test_idx: np.ndarray, frame: Any, args: argparse.Namespace
          ) -> dict[str, Any]:
    from meddx.inference import Predictor
    from meddx.modalities.loading import load_bundle
    from meddx.package import load_package
    from meddx.statistics.operating_points import ThresholdSelector
    from meddx.training import train

    run = args.workdir / f"cv{args.cv_size}-e{args.cv_epochs}-fold{k}"
    data = _fold_csv(frame, test_idx, run / "data", seed=k)
    cfg = _config(data, args)
    start = time.perf_counter()
    package = (load_package(run / "model") if (run / "model" / "manifest.json").is_file()
               else train(cfg, out=run, progress=False))
    bundle = load_bundle(cfg)
    task = bundle.task
    mel = task.class_names.index(MEL)
    predictor = Predictor(package, backend="torch")
    out: dict[str, Any] = {"fold": k, "wall_s": round(time.perf_counter() - start, 1),
                           "best_epoch": package.card.training.get("best_epoch")}
    for name in ("calib", "test"):
        s = bundle.splits[name]
        y = (task.target_index(np.asarray(s.targets)) == mel).astype(int)
        out[f"{name}_y"] = y.tolist()
        for arm, fused in (("image", False), ("fused", True)):
            _, p = predictor.predict_split(s, fused=fused)
            out[f"{name}_{arm}"] = p[:, mel].round(6).tolist()
    for arm in ("image", "fused"):
        sel = ThresholdSelector("specificity", args.derm_spec).fit(
            np.asarray(out["calib_y"]), np.asarray(out[f"calib_{arm}"]))
        out[f"threshold_{arm}"] = float(sel.threshold_)
    out["coefficients"] = dict(zip(package.card.side_inputs.features,
                                   np.round(package.card.side_inputs.coef[mel], 3).tolist(),
                                   strict=True))
    return out


def run_cv(args: argparse.Namespace, wilson: Any, delong_ci: Any) -> dict[str, Any]:
    """Train the folds (reusing finished ones) and pool their out-of-fold figures."""
    from sklearn.model_selection import StratifiedKFold

    from meddx.statistics.compare import delong_test

    frame = _frame()
    folds = StratifiedKFold(args.cv_folds, shuffle=True, random_state=0)
    rows = [_fold(k, test, frame, args) for k, (_, test) in
            enumerate(folds.split(np.zeros(len(frame)), frame["label"]))]
    y = np.concatenate([r["test_y"] for r in rows])
    res: dict[str, Any] = {"arm": "cv", "seed": 0, "folds": args.cv_folds, "size": args.cv_size,
                           "epochs": args.cv_epochs, "n": len(y), "positives": int(y.sum()),
                           "age_missing": int((frame["age"].isin(["", "unknown"])).sum()),
                           "sex_missing": int((~frame["sex"].isin(["female", "male"])).sum()),
                           "train_wall_s": [r["wall_s"] for r in rows],
                           "coefficients": [r["coefficients"] for r in rows], "cv": {}}
    for arm in ("image", "fused"):
        s = np.concatenate([r[f"test_{arm}"] for r in rows])
        auc, lo, hi = delong_ci(y, s)
        flag = np.concatenate([np.asarray(r[f"test_{arm}"]) >= r[f"threshold_{arm}"]
                               for r in rows])
        tp, pos = int((flag & (y == 1)).sum()), int(y.sum())
        tn, neg = int((~flag & (y == 0)).sum()), int((y == 0).sum())
        from sklearn.metrics import roc_auc_score

        res["cv"][arm] = {
            "auc": auc, "auc_ci": [lo, hi],
            "fold_aucs": [round(float(roc_auc_score(r["test_y"], r[f"test_{arm}"])), 4)
                          for r in rows],
            "sensitivity": tp / pos, "sensitivity_ci": list(wilson(tp, pos)),
            "specificity": tn / neg, "specificity_ci": list(wilson(tn, neg))}
    t = delong_test(y, np.concatenate([r["test_fused"] for r in rows]),
                    np.concatenate([r["test_image"] for r in rows]))
    res["cv"]["difference"] = {"value": t["difference"], "ci": [t["low"], t["high"]],
                               "p_value": t["p_value"]}
    return res


def cv_section(rows: list[dict[str, Any]], derm: tuple[float, float, float]) -> list[str]:
    """The results file's section for the CV rows."""
    sens, spec, auc = derm
    out: list[str] = []
    for r in rows:
        c = r["cv"]
        cell = lambda v, ci: f"{v:.3f} ({ci[0]:.3f}–{ci[1]:.3f})"  # noqa: E731
        vs = lambda ci: ("above" if ci[0] > auc else "below" if ci[1] < auc  # noqa: E731
                         else "CI includes")
        d = c["difference"]
        out += ["", f"## Image + metadata (age, sex): {r['folds']}-fold cross-validation over "
                "train+val", "",
                f"The only ISIC 2017 images with age and sex are train+val ({r['n']} images, "
                f"{r['positives']} melanoma; age missing for {r['age_missing']}, sex for "
                f"{r['sex_missing']} — flagged, not imputed). Stratified {r['folds']}-fold CV; "
                f"per fold one package trained with `side_inputs: [age, sex]` (late fusion, "
                f"a logistic model over the network's logits + encoded age/sex, fitted on the "
                f"fold's calib split) on a **reduced recipe**: {r['size']} px, "
                f"{r['epochs']} epoch{'s' if r['epochs'] != 1 else ''}, otherwise `configs/isic2017.yaml` (the full 128-px "
                f"recipe takes ~40 min per model here: five would not fit). Image-only = the "
                f"same package's network, unfused: both arms share folds and weights. "
                f"Out-of-fold melanoma probabilities pooled over folds; DeLong 95% CIs; paired "
                f"DeLong test for the difference; threshold for {spec:.0%} specificity fitted "
                f"on each fold's calib split, test counts pooled, Wilson intervals. Training "
                f"minutes per fold: {', '.join(f'{w / 60:.1f}' for w in r['train_wall_s'])}.",
                "", "| arm | melanoma AUC (DeLong CI) | vs dermatologists' 0.71 | per-fold AUC | "
                f"sensitivity at calib-fitted {spec:.0%} specificity | specificity |",
                "|---|---|---|---|---|---|"]
        for arm, label in (("image", "image only"), ("fused", "image + age + sex")):
            a = c[arm]
            out.append(f"| {label} | {cell(a['auc'], a['auc_ci'])} | {vs(a['auc_ci'])} | "
                       f"{', '.join(f'{x:.3f}' for x in a['fold_aucs'])} | "
                       f"{cell(a['sensitivity'], a['sensitivity_ci'])} | "
                       f"{cell(a['specificity'], a['specificity_ci'])} |")
        out += ["", f"Difference (fused − image): {d['value']:+.3f} (95% CI {d['ci'][0]:+.3f} "
                f"to {d['ci'][1]:+.3f}), p = {d['p_value']:.2g}. Dermatologists: ROC area {auc}, "
                f"sensitivity {sens:.0%} at specificity {spec:.0%}.", "",
                "Fitted melanoma weights per fold (age standardised on calib):", ""]
        for k, co in enumerate(r["coefficients"]):
            out.append(f"- fold {k}: " + ", ".join(f"{n} {v:+.2f}" for n, v in co.items()))
    return out
