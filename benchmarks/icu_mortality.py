"""ICU mortality on PhysioNet/CinC 2012 (set-a + set-b, our fixed test split).

Trains the GRU-D model as the recipe ships it (configs/physionet2012.yaml: a deep ensemble of
five GRU-D networks), the logistic baseline on summary features and, for comparison, a single
GRU-D network of the recipe, with ``meddx.training.train``; then reports on the test split,
with SAPS-I from the outcome files as the clinical baseline:

* AUROC and AUPRC with 95% stratified bootstrap CIs;
* Event 1 = min(sensitivity, PPV) at a threshold chosen on the calibration split (the
  challenge scored fixed decisions), with a bootstrap CI: flagging as many calib stays as
  there were deaths (Se = PPV there; chosen over the calib argmax on the validation split),
  and the calib argmax beside it;
* ECE (15 bins) of the calibrated risk (temperature fitted on calib), and before calibration;
* paired DeLong tests: GRU-D vs SAPS-I and logistic vs SAPS-I (on the stays with a SAPS-I),
  GRU-D vs logistic (all test stays);
* subgroups (sex, age band, ICU type) for GRU-D; AUROC when predicting after 6/12/24/36/48 h;
* training wall time (threads as configured, default 1).

SAPS-I is missing (-1) for 352 of the 8,000 stays: its figures and every comparison with it
use only the test stays that have one; the models' own figures use every test stay.

Usage::

    nice -n 10 .venv/bin/python benchmarks/icu_mortality.py [--epochs 40] [--threads 1]
        [--models grud logistic] [--runs runs/bench_icu] [--bootstrap 1000]
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

TARGETS = {"auroc": 0.84, "auroc_stretch": 0.86, "event1": 0.50, "event1_winner": 0.5353}


def _probs_from_logits(task: Any, logits: np.ndarray, temperature: float) -> np.ndarray:
    from meddx.statistics.calibration import apply_temperature

    return apply_temperature(task, logits, temperature)[:, task.positive_index]


def _ranking_ci(task: Any, y: np.ndarray, p: np.ndarray, n_boot: int) -> dict[str, Any]:
    from meddx.statistics.bootstrap import bootstrap_metrics

    probs = np.stack([1 - p, p], axis=1) if task.positive_index == 1 else np.stack([p, 1 - p], 1)
    m = bootstrap_metrics(task, y, probs, n_resamples=n_boot, seed=0)
    return {k: m[k] for k in ("auroc", "auprc", "brier") if k in m}


def _score(task: Any, y_cal: np.ndarray, p_cal: np.ndarray, y: np.ndarray, p: np.ndarray,
           n_boot: int) -> dict[str, Any]:
    from meddx.modalities.ehr.score import bootstrap_event1, event1_threshold
    from meddx.statistics.calibration import expected_calibration_error

    out = _ranking_ci(task, y, p, n_boot)
    for key, method in (("event1", "prevalence"), ("event1_argmax", "argmax")):
        thr, calib_e1 = event1_threshold(y_cal, p_cal, method=method)
        out[key] = bootstrap_event1(y, p, thr, n_resamples=n_boot)
        out[key].update(calib_event1=calib_e1, method=method)
    probs = np.stack([1 - p, p], axis=1)
    out["ece"] = expected_calibration_error(y, probs, n_bins=15, positive_index=1)
    return out


def _train(model: str, args: argparse.Namespace) -> tuple[Any, float]:
    from meddx.config import load_config
    from meddx.training import train

    cfg = load_config(ROOT / "configs" / "physionet2012.yaml")
    dotted: dict[str, Any] = {"name": f"icu-{model}", "model.name": model,
                              "train.threads": args.threads}
    if model == "grud_single":  # one network of the recipe's ensemble (its seed)
        dotted.update({"model.name": "grud",
                       "model.options": {**cfg.model.options, "members": 1}})
    elif model != "grud":
        dotted["model.options"] = {}
    if args.epochs:
        dotted["train.epochs"] = args.epochs
    if model == "logistic":
        dotted["train.lr"] = 3e-3
    cfg = cfg.updated(**dotted)
    run = Path(args.runs) / model
    if args.reuse and (run / "model").is_dir():
        from meddx.package import load_package

        package = load_package(run / "model")
        return package, float(package.card.training.get("wall_time_s", float("nan")))
    # a checkpoint left by an earlier run would be restored as "best": start clean
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    start = time.perf_counter()
    package = train(cfg, out=run, progress=False)
    return package, time.perf_counter() - start


def _predict(package: Any, bundle: Any, split: str, hours: int | None = None) -> np.ndarray:
    from meddx.inference import Predictor
    from meddx.modalities.ehr.features import truncate

    pred = Predictor(package, backend="torch", bf16=False)
    s = bundle.splits[split]
    x = s.inputs if hours is None else truncate(s.inputs, hours, bundle.input_spec["layout"])
    out = [pred.logits(torch.from_numpy(np.ascontiguousarray(x[i:i + 512])))
           for i in range(0, len(x), 512)]
    return np.concatenate(out)


def _subgroups(task: Any, y: np.ndarray, p: np.ndarray, meta: Any, n_boot: int) -> list[dict]:
    from meddx.statistics.subgroups import subgroup_analysis

    probs = np.stack([1 - p, p], axis=1)
    res = subgroup_analysis(task, y, probs, meta[["sex", "age_band", "icu_type"]],
                            n_resamples=n_boot, metrics=["auroc", "auprc"])
    return [dict(r) for r in res.rows]


def _saps(meta: Any, y: np.ndarray, cal_meta: Any, y_cal: np.ndarray, task: Any,
          n_boot: int) -> tuple[dict[str, Any], np.ndarray]:
    have = meta["saps_i"].notna().to_numpy()
    have_cal = cal_meta["saps_i"].notna().to_numpy()
    s, s_cal = meta["saps_i"].to_numpy()[have], cal_meta["saps_i"].to_numpy()[have_cal]
    # SAPS-I is a score, not a probability: Event 1 and ranking only (no ECE)
    from meddx.modalities.ehr.score import bootstrap_event1, event1_threshold

    scaled = (s - s.min()) / max(s.max() - s.min(), 1)
    out = _ranking_ci(task, y[have], scaled, n_boot)
    out.pop("brier", None)
    for key, method in (("event1", "prevalence"), ("event1_argmax", "argmax")):
        thr, _ = event1_threshold(y_cal[have_cal], s_cal, method=method)
        out[key] = bootstrap_event1(y[have], s, thr, n_resamples=n_boot)
    out["n"] = int(have.sum())
    out["n_missing"] = int((~have).sum())
    return out, have


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=["grud", "logistic", "grud_single"],
                        help="grud: the recipe (a deep ensemble of GRU-D networks); "
                             "grud_single: one GRU-D network of the recipe; logistic; "
                             "ehr_transformer")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "bench_icu"))
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--note", default="shared with other jobs",
                        help="how loaded the machine was (goes into the report)")
    parser.add_argument("--reuse", action="store_true",
                        help="evaluate the packages already in --runs instead of training")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)

    from meddx.statistics.compare import delong_test
    from meddx.training import load_bundle

    bundle = load_bundle(ROOT / "configs" / "physionet2012.yaml")
    task = bundle.task
    test, calib = bundle.splits["test"], bundle.splits["calib"]
    y, y_cal = np.asarray(test.targets, int), np.asarray(calib.targets, int)
    results: dict[str, Any] = {"dataset": "physionet2012", "split": "test (packaged list)",
                               "n_test": len(test), "deaths_test": int(y.sum()),
                               "targets": TARGETS, "threads": args.threads, "models": {},
                               "note": args.note}
    scores: dict[str, np.ndarray] = {}
    early: dict[str, dict[int, np.ndarray]] = {}
    for model in args.models:
        package, wall = _train(model, args)
        temp = package.card.calibration.temperature if package.card.calibration else 1.0
        z, z_cal = _predict(package, bundle, "test"), _predict(package, bundle, "calib")
        p, p_cal = _probs_from_logits(task, z, temp), _probs_from_logits(task, z_cal, temp)
        entry = _score(task, y_cal, p_cal, y, p, args.bootstrap)
        entry["ece_uncalibrated"] = _score(task, y_cal, _probs_from_logits(task, z_cal, 1.0), y,
                                           _probs_from_logits(task, z, 1.0), 0)["ece"]
        entry.update(members=int(package.card.network.get("options", {}).get("members", 1)),
                     temperature=temp, train_wall_s=round(wall, 1),
                     epochs_run=package.card.training.get("epochs_run"),
                     best_epoch=package.card.training.get("best_epoch"))
        entry["by_hours"], early[model] = {}, {}
        for h in (6, 12, 24, 36, 48):
            ph = _probs_from_logits(task, _predict(package, bundle, "test", h), temp)
            entry["by_hours"][str(h)] = _ranking_ci(task, y, ph, 0)["auroc"]["value"]
            early[model][h] = ph
        if model == args.models[0]:
            entry["subgroups"] = _subgroups(task, y, p, test.metadata, min(args.bootstrap, 300))
        results["models"][model] = entry
        scores[model] = p
        logging.info("%s: %s", model, {k: entry[k] for k in ("auroc", "event1", "ece")})
    saps, have = _saps(test.metadata, y, calib.metadata, y_cal, task, args.bootstrap)
    results["saps_i"] = saps
    comparisons = {}
    for model, p in scores.items():
        comparisons[f"{model}_vs_saps_i"] = delong_test(y[have], p[have],
                                                        test.metadata["saps_i"].to_numpy()[have])
        for other, q in scores.items():
            if other != model and f"{other}_vs_{model}" not in comparisons:
                comparisons[f"{model}_vs_{other}"] = delong_test(y, p, q)
    results["delong"] = comparisons
    first = args.models[0]
    results["delong_by_hours"] = {
        f"{first}_vs_{other}@{h}h": delong_test(y, early[first][h], early[other][h])
        for other in args.models[1:] for h in (6, 12, 24, 36)}
    _write(results)


def _fmt(m: dict[str, float]) -> str:
    return f"{m['value']:.3f} ({m['low']:.3f}-{m['high']:.3f})"


def _write(results: dict[str, Any]) -> None:
    from meddx.evaluation.evaluator import json_safe

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "icu_mortality.json").write_text(json.dumps(json_safe(results), indent=2))
    lines = ["# ICU mortality — PhysioNet/CinC 2012 (set-a + set-b), our test split", "",
             f"{results['n_test']} test stays, {results['deaths_test']} deaths; "
             f"{results['threads']} thread(s). Event 1 at a threshold fixed on calib: as many stays "
             "flagged as there were deaths (Se = PPV; the rule was chosen over the calib argmax "
             "on the validation split); the calib argmax is listed below the table. "
             "ECE: 15 bins, calibrated risk (temperature fitted on calib). Train wall: "
             f"Trainer.fit on a 2-core machine ({results.get('note', 'shared with other jobs')})."
             "", "",
             "| model | AUROC (95% CI) | AUPRC (95% CI) | Event 1 (95% CI) | ECE | train wall |",
             "|---|---|---|---|---|---|"]
    for name, m in results["models"].items():
        e1 = m["event1"]
        label = f"{name} (ensemble of {m['members']})" if m.get("members", 1) > 1 else name
        lines.append(f"| {label} | {_fmt(m['auroc'])} | {_fmt(m['auprc'])} | "
                     f"{e1['event1']:.3f} ({e1['low']:.3f}-{e1['high']:.3f}) | "
                     f"{m['ece']:.3f} (uncal. {m['ece_uncalibrated']:.3f}) | "
                     f"{m['train_wall_s']:.0f} s |")
    s = results["saps_i"]
    lines.append(f"| SAPS-I (n={s['n']}) | {_fmt(s['auroc'])} | {_fmt(s['auprc'])} | "
                 f"{s['event1']['event1']:.3f} ({s['event1']['low']:.3f}-"
                 f"{s['event1']['high']:.3f}) | — | — |")
    lines += ["", "Event 1 with the threshold that maximised it on calib instead: " + "; ".join(
        f"{name} {m['event1_argmax']['event1']:.3f} ({m['event1_argmax']['low']:.3f}-"
        f"{m['event1_argmax']['high']:.3f})" for name, m in
        [*results["models"].items(), ("SAPS-I", s)]) + "."]
    lines += ["", f"SAPS-I missing for {s['n_missing']} test stays: SAPS-I figures and comparisons "
              "with it use the stays that have one.", "", "Paired DeLong tests:", ""]
    for k, d in results["delong"].items():
        lines.append(f"- {k}: ΔAUROC {d['difference']:+.3f} ({d['low']:+.3f} to "
                     f"{d['high']:+.3f}), p = {d['p_value']:.2g}")
    lines += ["", "Paired DeLong tests when predicting earlier (truncated test stays):", ""]
    for k, d in results.get("delong_by_hours", {}).items():
        lines.append(f"- {k}: ΔAUROC {d['difference']:+.3f} ({d['low']:+.3f} to "
                     f"{d['high']:+.3f}), p = {d['p_value']:.2g}")
    lines += ["", "AUROC by hours of data since ICU admission:", "",
              "| model | " + " | ".join(f"{h} h" for h in ("6", "12", "24", "36", "48")) + " |",
              "|---|---|---|---|---|---|"]
    for name, m in results["models"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in m["by_hours"].values()) + " |")
    first = next(iter(results["models"].values()))
    if first.get("subgroups"):
        lines += ["", "Subgroups (first model; flag: CI entirely below the overall AUROC):", "",
                  "| group | n | deaths | AUROC (95% CI) | flag |", "|---|---|---|---|---|"]
        for r in first["subgroups"]:
            if r["metric"] == "auroc":
                lines.append(f"| {r['column']} = {r['group']} | {r['n']} | {r['positives']} | "
                             f"{_fmt(r)} | {'yes' if r['flag'] else ''} |")
    lines += ["", f"Targets: AUROC ≥ {TARGETS['auroc']}, Event 1 ≥ {TARGETS['event1']} "
              f"(challenge winner {TARGETS['event1_winner']} on set-c). One split of this size "
              "moves Event 1 by about ±0.06 by chance: `benchmarks/icu_cv.py` scores the same "
              "recipe by 5-fold cross-validation over all stays (`icu_cv.md`)."]
    (RESULTS / "icu_mortality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
