"""ICU mortality by 5-fold cross-validation over all 8,000 PhysioNet 2012 stays (set-a + set-b).

``benchmarks/icu_mortality.py`` scores one fixed test split: 1,598 stays and 224 deaths, so
Event 1 carries a ±0.06 interval and a 0.01 AUROC difference cannot be told from chance. This
script trains the same recipe (``configs/physionet2012.yaml``) five times, each time holding
out one fold as test, and pools the out-of-fold predictions, so that every stay is scored by
a model that never saw it: 8,000 stays and 1,122 deaths.

Folds: stratified on in-hospital death (seed 2012); of the other four folds, one eighth is val
(early stopping) and the rest train, from which the recipe carves calib (15%): the packaged
split's 70/10/20 proportions. The record lists are written to ``<runs>/fold<k>/lists/`` and
read through ``data.options.split_lists`` (a folder), as a user would.

Per fold and model: calibrated risk (temperature fitted on that fold's calib) and the Event 1
threshold fixed on that fold's calib (as many stays flagged as there were deaths, the rule of
``icu_mortality.py``). Pooled: AUROC/AUPRC with bootstrap CIs, Event 1 (each stay judged by
its own fold's threshold) with a bootstrap CI, ECE, and paired DeLong tests of the GRU-D
ensemble against the logistic baseline and against its own first member (one GRU-D network,
packaged in ``members/0``) at 6/12/24/36/48 h of data.

Decision rules: every operating point a package's card holds (``sensitivity@0.8``,
``specificity@0.9``, ``youden``, ``balanced``), fitted per fold on that fold's calibrated calib
risks exactly as the trainer fits them (:class:`~meddx.statistics.operating_points.
ThresholdSelector`), applied to its test stays; pooled Event 1 = min(Se, PPV), sensitivity,
PPV and alerts per 100 stays with bootstrap CIs, and Event 1 per fold. The recipe's packaged
default (``evaluation.default_operating_point``) is marked. Computed from the saved
predictions, so ``--report-only`` adds them to folds trained before they existed.

Usage::

    nice -n 10 .venv/bin/python benchmarks/icu_cv.py              # all folds, then the report
    .venv/bin/python benchmarks/icu_cv.py --folds 0 2 4 --no-report  # part of the folds
    .venv/bin/python benchmarks/icu_cv.py --report-only           # pool what is there
    .venv/bin/python benchmarks/icu_cv.py --fold-seed 7 --runs runs/bench_icu_cv_s7 \
        --name icu_cv_seed7                                       # other folds (repeated CV)

A fold whose predictions are saved (``<runs>/fold<k>/predictions.npz``) is not trained again.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
from _common import RESULTS  # noqa: E402

HOURS = (6, 12, 24, 36, 48)
MODELS = ("grud", "logistic")  # "grud_single" is read from the ensemble's members/0
K = 5


def fold_lists(seed: int = 2012) -> list[dict[str, list[str]]]:
    """Record lists of the five folds (test = fold k; val = 1/8 of the rest, stratified)."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    from meddx.catalog import get_entry, resolve
    from meddx.modalities.ehr.io import read_outcomes

    paths = resolve(get_entry("physionet2012"))
    outcomes = read_outcomes([p for p in paths if p.is_file() and p.name.startswith("Outcomes")])
    ids = np.array(sorted(outcomes.index, key=int))
    y = outcomes.loc[ids, "in_hospital_death"].to_numpy(int)
    folds = []
    for rest, test in StratifiedKFold(K, shuffle=True, random_state=seed).split(ids, y):
        train, val = train_test_split(rest, test_size=1 / 8, stratify=y[rest], random_state=seed)
        folds.append({"train": sorted(ids[train], key=int), "val": sorted(ids[val], key=int),
                      "test": sorted(ids[test], key=int)})
    return folds


def _config(model: str, lists: Path, threads: int, epochs: int | None) -> Any:
    from meddx.config import load_config

    cfg = load_config(ROOT / "configs" / "physionet2012.yaml")
    dotted: dict[str, Any] = {"name": f"icu-cv-{model}", "model.name": model,
                              "train.threads": threads,
                              "data.options": {**cfg.data.options, "split_lists": str(lists)}}
    if model == "logistic":  # as in icu_mortality.py
        dotted.update({"model.options": {}, "train.lr": 3e-3})
    if epochs:
        dotted["train.epochs"] = epochs
    return cfg.updated(**dotted)


def _risks(package: Any, bundle: Any, split: str) -> dict[str, np.ndarray]:
    """Calibrated risk of every stay of ``split`` after 6 … 48 h of data."""
    from icu_mortality import _predict, _probs_from_logits

    temp = package.card.calibration.temperature if package.card.calibration else 1.0
    return {str(h): _probs_from_logits(bundle.task, _predict(
        package, bundle, split, None if h == 48 else h), temp) for h in HOURS}


def run_fold(k: int, lists: dict[str, list[str]], args: argparse.Namespace) -> None:
    from meddx.package import load_package
    from meddx.training import load_bundle, train

    fold = Path(args.runs) / f"fold{k}"
    done = fold / "predictions.npz"
    if done.is_file():
        logging.info("fold %d: predictions already saved in %s", k, done)
        return
    (fold / "lists").mkdir(parents=True, exist_ok=True)
    for split, ids in lists.items():
        (fold / "lists" / f"{split}.txt").write_text(
            f"# PhysioNet 2012 5-fold CV (benchmarks/icu_cv.py), fold {k}, {split}\n"
            + "\n".join(ids) + "\n")
    out: dict[str, np.ndarray] = {}
    walls: dict[str, float] = {}
    bundle = None
    for model in MODELS:
        cfg = _config(model, fold / "lists", args.threads, args.epochs)
        bundle = bundle or load_bundle(cfg)
        run = fold / model
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
        start = time.perf_counter()
        package = (load_package(run / "model") if (run / "model").is_dir()
                   else train(cfg, out=run, progress=False, bundle=bundle))
        walls[model] = time.perf_counter() - start
        packages = {model: package}
        if model == "grud":
            packages["grud_single"] = load_package(run / "members" / "0" / "model")
        for name, pkg in packages.items():
            for split in ("test", "calib"):
                for h, p in _risks(pkg, bundle, split).items():
                    out[f"{name}/{split}/{h}"] = p
    test, calib = bundle.splits["test"], bundle.splits["calib"]
    np.savez(done, **out, test_y=np.asarray(test.targets, int),
             calib_y=np.asarray(calib.targets, int), test_ids=np.asarray(test.ids),
             saps_i=test.metadata["saps_i"].to_numpy(float),
             walls=json.dumps(walls))
    logging.info("fold %d done: %s", k, {m: f"{w:.0f} s" for m, w in walls.items()})


def report(args: argparse.Namespace) -> dict[str, Any]:
    from icu_mortality import TARGETS, _ranking_ci

    from meddx.catalog import get_entry
    from meddx.modalities.ehr.score import bootstrap_event1, event1_score, event1_threshold
    from meddx.statistics.calibration import expected_calibration_error
    from meddx.statistics.compare import delong_test

    task = get_entry("physionet2012").task
    files = sorted(Path(args.runs).glob("fold*/predictions.npz"))
    if not files:
        raise SystemExit(f"no fold predictions under {args.runs}: run the folds first")
    folds = [np.load(f) for f in files]
    names = ["grud", "logistic", "grud_single"]
    y = np.concatenate([f["test_y"] for f in folds])
    pooled: dict[str, dict[str, np.ndarray]] = {n: {} for n in names}
    flags: dict[str, np.ndarray] = {}
    per_fold: dict[str, list[float]] = {n: [] for n in names}
    auroc_fold: dict[str, list[float]] = {n: [] for n in names}
    for n in names:
        for h in map(str, HOURS):
            pooled[n][h] = np.concatenate([f[f"{n}/test/{h}"] for f in folds])
        fl = []
        for f in folds:
            thr, _ = event1_threshold(f["calib_y"], f[f"{n}/calib/48"], method="prevalence")
            p = f[f"{n}/test/48"]
            fl.append(p >= thr)
            per_fold[n].append(event1_score(f["test_y"], p, thr)["event1"])
            auroc_fold[n].append(_ranking_ci(task, f["test_y"], p, 0)["auroc"]["value"])
        flags[n] = np.concatenate(fl)
    results: dict[str, Any] = {"folds": len(folds), "n": int(len(y)), "deaths": int(y.sum()),
                               "fold_seed": args.fold_seed, "targets": TARGETS, "models": {},
                               "delong": {}}
    for n in names:
        p = pooled[n]["48"]
        m = _ranking_ci(task, y, p, args.bootstrap)
        # each stay judged by its own fold's threshold: bootstrap the pooled 0/1 flags
        e1 = bootstrap_event1(y, flags[n].astype(float), 0.5, n_resamples=args.bootstrap)
        m.update(event1=e1, event1_folds=per_fold[n], auroc_folds=auroc_fold[n],
                 ece=expected_calibration_error(y, np.stack([1 - p, p], 1), n_bins=15,
                                                positive_index=1),
                 by_hours={h: _ranking_ci(task, y, pooled[n][h], 0)["auroc"]["value"]
                           for h in map(str, HOURS)})
        results["models"][n] = m
    for other in ("logistic", "grud_single"):
        for h in map(str, HOURS):
            results["delong"][f"grud_vs_{other}@{h}h"] = delong_test(
                y, pooled["grud"][h], pooled[other][h])
    saps = np.concatenate([f["saps_i"] for f in folds])
    have = ~np.isnan(saps)
    results["saps_i"] = {"n": int(have.sum()), "auroc": _ranking_ci(
        task, y[have], (saps[have] - saps[have].min()) / np.ptp(saps[have]), 0)["auroc"]["value"]}
    results["delong"]["grud_vs_saps_i@48h"] = delong_test(y[have], pooled["grud"]["48"][have],
                                                          saps[have])
    results["train_wall_s"] = {n: [json.loads(str(f["walls"]))[n] for f in folds]
                               for n in ("grud", "logistic")}
    results["decision_rules"] = decision_rules(folds, names, task, args.bootstrap)
    from _common import environment

    results["environment"] = environment()
    _write(results, args.name)
    return results


def decision_rules(folds: list[Any], names: list[str], task: Any, n_boot: int
                   ) -> dict[str, Any]:
    """Every card operating point per fold (fitted on calib at 48 h), pooled over the folds."""
    from meddx.config import load_config
    from meddx.modalities.ehr.score import event1_score, event1_threshold
    from meddx.statistics.alerts import alert_figures
    from meddx.statistics.bootstrap import bootstrap_metrics
    from meddx.statistics.operating_points import ThresholdSelector, operating_point_name

    ev = load_config(ROOT / "configs" / "physionet2012.yaml").evaluation
    targets = {"sensitivity": ev.target_sensitivity, "specificity": ev.target_specificity}
    rules = [(m, targets.get(m)) for m in ("sensitivity", "specificity", "youden", "balanced")]
    # not a card point: the calib cut that maximises Event 1 itself, to compare with balanced
    rules.append(("event1_argmax", None))
    default = operating_point_name(ev.default_operating_point,
                                   targets.get(ev.default_operating_point))
    y = np.concatenate([f["test_y"] for f in folds])
    out: dict[str, Any] = {"default": default, "models": {}}
    for n in names:
        rows = {}
        for method, target in rules:
            flags, per_fold = [], []
            for f in folds:
                if method == "event1_argmax":
                    thr, _ = event1_threshold(f["calib_y"], f[f"{n}/calib/48"], "argmax")
                else:
                    thr = ThresholdSelector(method, target or 0.5).fit(
                        f["calib_y"], f[f"{n}/calib/48"]).threshold_
                p = f[f"{n}/test/48"]
                flags.append((p >= thr).astype(float))
                per_fold.append(event1_score(f["test_y"], p, thr))
            fl = np.concatenate(flags)
            probs = np.stack([1 - fl, fl], axis=1)  # each stay judged by its own fold's rule
            ci = bootstrap_metrics(task, y, probs, 0.5, n_resamples=n_boot)
            rows[operating_point_name(method, target)] = {
                **alert_figures(task, y, probs, 0.5, n_resamples=n_boot),
                "sensitivity": ci["sensitivity"], "ppv": ci["ppv"],
                "event1_folds": [r["event1"] for r in per_fold],
                "alerts_per_100_folds": [100 * r["n_flagged"] / len(f["test_y"])
                                         for r, f in zip(per_fold, folds, strict=True)]}
        out["models"][n] = rows
    return out


def _fmt(m: dict[str, float]) -> str:
    return f"{m['value']:.3f} ({m['low']:.3f}-{m['high']:.3f})"


def _decision_lines(r: dict[str, Any], label: dict[str, str]) -> list[str]:
    d = r.get("decision_rules")
    if not d:
        return []
    lines = ["", "Decision rules: each card operating point fitted on each fold's calib (48 h, "
             "calibrated risk), applied to that fold's test stays, pooled (95% CIs: stratified "
             f"bootstrap of the pooled stays). Packaged default of the recipe: `{d['default']}`.",
             "", "| model | operating point | Event 1 = min(Se, PPV) (95% CI) | sensitivity | PPV "
             "| alerts per 100 stays (95% CI) | Event 1 per fold |",
             "|---|---|---|---|---|---|---|"]
    for n, rows in d["models"].items():
        for op, m in rows.items():
            mark = " **(default)**" if op == d["default"] else (
                " (not a card point)" if op == "event1_argmax" else "")
            lines.append(f"| {label[n]} | {op}{mark} | {_fmt(m['min_sensitivity_ppv'])} | "
                         f"{_fmt(m['sensitivity'])} | {_fmt(m['ppv'])} | "
                         f"{m['alerts_per_100']['value']:.1f} ({m['alerts_per_100']['low']:.1f}"
                         f"-{m['alerts_per_100']['high']:.1f}) | "
                         + ", ".join(f"{v:.3f}" for v in m["event1_folds"]) + " |")
    return lines


def _write(r: dict[str, Any], name: str) -> None:
    from meddx.evaluation.evaluator import json_safe

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(json_safe(r), indent=2))
    label = {"grud": "GRU-D ensemble of 5 (recipe)", "logistic": "logistic",
             "grud_single": "one GRU-D (member 0)"}
    lines = ["# ICU mortality — 5-fold cross-validation over PhysioNet 2012 set-a + set-b", "",
             f"{r['folds']} folds (stratified, seed {r['fold_seed']}), out-of-fold predictions "
             f"pooled: {r['n']} stays, "
             f"{r['deaths']} deaths. Each fold: the recipe trained on its own train/val, "
             "temperature and the Event 1 threshold (as many calib stays flagged as there were "
             "deaths) fixed on its own calib. 95% CIs: stratified bootstrap of the pooled "
             "stays. Reproduce: `python benchmarks/icu_cv.py`.", "",
             "| model | AUROC (95% CI) | AUPRC (95% CI) | Event 1 (95% CI) | Event 1 per fold "
             "| AUROC per fold | ECE |", "|---|---|---|---|---|---|---|"]
    for n, m in r["models"].items():
        e1 = m["event1"]
        lines.append(f"| {label[n]} | {_fmt(m['auroc'])} | {_fmt(m['auprc'])} | "
                     f"{e1['event1']:.3f} ({e1['low']:.3f}-{e1['high']:.3f}) | "
                     + ", ".join(f"{v:.3f}" for v in m["event1_folds"]) + " | "
                     + ", ".join(f"{v:.3f}" for v in m["auroc_folds"]) + f" | {m['ece']:.3f} |")
    s = r["saps_i"]
    lines.append(f"| SAPS-I (n={s['n']}) | {s['auroc']:.3f} | | | | | |")
    lines += ["", "Paired DeLong tests on the pooled out-of-fold predictions:", "",
              "| comparison | 6 h | 12 h | 24 h | 36 h | 48 h |", "|---|---|---|---|---|---|"]
    for other in ("logistic", "grud_single"):
        cells = [f"{d['difference']:+.3f} (p={d['p_value']:.2g})" for d in
                 (r["delong"][f"grud_vs_{other}@{h}h"] for h in HOURS)]
        lines.append(f"| ensemble − {label[other]} | " + " | ".join(cells) + " |")
    d = r["delong"]["grud_vs_saps_i@48h"]
    lines += ["", f"Ensemble − SAPS-I at 48 h (stays with a SAPS-I): {d['difference']:+.3f} "
              f"(p = {d['p_value']:.2g}).", "", "AUROC by hours of data since ICU admission:",
              "", "| model | " + " | ".join(f"{h} h" for h in HOURS) + " |",
              "|---|---|---|---|---|---|"]
    for n, m in r["models"].items():
        lines.append(f"| {label[n]} | " + " | ".join(f"{v:.3f}" for v in m["by_hours"].values())
                     + " |")
    lines += _decision_lines(r, label)
    w = r["train_wall_s"]
    cpu = r.get("environment", {}).get("cpu")
    lines += ["", (f"CPU: {cpu}. " if cpu else "") + "Train wall per fold (s, one thread, on a "
              "shared machine: load from other jobs varies, so these are not speed figures): "
              "ensemble "
              + ", ".join(f"{v:.0f}" for v in w["grud"]) + "; logistic "
              + ", ".join(f"{v:.0f}" for v in w["logistic"]) + ".",
              "", f"Targets (issue 7, on the fixed test split): AUROC ≥ {r['targets']['auroc']}, "
              f"Event 1 ≥ {r['targets']['event1']}."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folds", type=int, nargs="+", default=list(range(K)))
    ap.add_argument("--runs", default=str(ROOT / "runs" / "bench_icu_cv"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--fold-seed", type=int, default=2012, help="seed of the fold assignment")
    ap.add_argument("--name", default="icu_cv", help="results/<name>.{json,md}")
    ap.add_argument("--no-report", action="store_true", help="train the folds only")
    ap.add_argument("--report-only", action="store_true", help="pool the saved predictions")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    if not args.report_only:
        lists = fold_lists(args.fold_seed)
        for k in args.folds:
            run_fold(k, lists[k], args)
    if not args.no_report:
        report(args)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    main()
