"""PhysioNet/CinC Challenge 2017 benchmark: train the default config, score our test split.

Trains ``configs/physionet2017.yaml`` (1D ResNet, 150 Hz, 30-s windows) with
``meddx.training.train`` and reports, on the fixed test split (1,024 records), the challenge
score (mean F1 of N, A, O) with a percentile bootstrap 95% CI, per-class F1, the confusion
matrix and the training wall time. Two evaluations are reported: the whole record (overlapping
30-s windows, mean probability: what ``meddx predict`` does) and the centre window only
(what ``Predictor.predict_split`` does).

Usage::

    nice -n 10 .venv/bin/python benchmarks/physionet2017.py                 # train + score
    .venv/bin/python benchmarks/physionet2017.py --model runs/physionet2017-bench/model  # score only
    .venv/bin/python benchmarks/physionet2017.py --minutes 20 --out runs/p17-short     # shorter run

Writes ``benchmarks/results/physionet2017.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
from _common import RESULTS, environment  # noqa: E402


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "physionet2017.yaml"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "physionet2017-bench"))
    ap.add_argument("--model", help="score this package instead of training")
    ap.add_argument("--minutes", type=float, help="override train.max_minutes")
    ap.add_argument("--epochs", type=int, help="override train.epochs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--name", default="physionet2017", help="results file stem")
    return ap.parse_args()


def _score(y: np.ndarray, pred: np.ndarray, classes: list[str], n_boot: int) -> dict[str, Any]:
    from meddx.modalities.ecg.score import bootstrap_challenge_score, challenge_score

    out = challenge_score(y, pred, classes)
    out["bootstrap"] = bootstrap_challenge_score(y, pred, classes, n_boot=n_boot)
    return out


def main() -> None:
    args = _args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    from meddx.inference import load_model
    from meddx.training import as_config, load_bundle, train

    cfg = as_config(args.config)
    cfg = cfg.updated(**{"train.max_minutes": args.minutes, "train.epochs": args.epochs,
                         "train.threads": args.threads})
    wall = None
    if args.model:
        package_path = Path(args.model)
    else:
        if (Path(args.out) / "checkpoints").exists():
            raise SystemExit(f"{args.out} holds an earlier run; give a new --out or delete it")
        start = time.perf_counter()
        package = train(cfg, Path(args.out), progress=False)
        wall = time.perf_counter() - start
        package_path = package.path
    predictor = load_model(package_path)
    card = predictor.card
    bundle = load_bundle(cfg)
    test = bundle.splits["test"]
    task = predictor.task
    classes = [str(v) for v in (task.label_values or task.class_names)]
    y = task.target_index(test.targets)
    start = time.perf_counter()
    # whole record as `meddx predict` sees it: window logits averaged, then fused with the
    # record's rhythm features where the package has them (`rhythm_features: true`)
    z_net = predictor.record_logits(test)  # the network alone, windows averaged
    z_win = predictor.fuse_split(z_net, test)
    t_win = time.perf_counter() - start
    z_ctr, _ = predictor.split_outputs(test)  # the network alone on the centre 30-s window
    result = {
        "benchmark": "physionet2017",
        "dataset": "PhysioNet/CinC 2017, bundled 6,822 records; our fixed test split",
        "n_test": len(test),
        "package": str(package_path),
        "network": card.network,
        "preprocessing": {k: card.preprocessing[k] for k in ("fs", "length", "stride", "leads")},
        "training": {k: card.training.get(k) for k in
                     ("epochs_run", "best_epoch", "best_score", "selection_metric",
                      "wall_time_s", "threads", "precision")},
        "train_call_wall_s": None if wall is None else round(wall, 1),
        "whole_record_windows": _score(y, z_win.argmax(1), classes, args.bootstrap),
        "fused": card.side_inputs is not None,
        "network_alone_whole_record": _score(y, z_net.argmax(1), classes, args.bootstrap),
        "centre_window": _score(y, z_ctr.argmax(1), classes, args.bootstrap),
        "predict_seconds_per_record": round(t_win / max(1, len(test)), 4),
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "torch_threads": torch.get_num_threads()},
        "environment": environment(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{args.name}.md").write_text(_markdown(result))
    print(_markdown(result))


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        "# PhysioNet/CinC 2017 (AF classification), our test split",
        "",
        f"Network: `{r['network']['name']}` {r['network'].get('options', {})}; "
        f"input {r['preprocessing']['fs']:g} Hz, window {r['preprocessing']['length']} samples.",
        (f"{r['environment']['cpu']}, {r['environment']['cores']} cores, torch "
         f"{r['environment']['torch']}, load {r['environment']['load_avg']:.2f}; "
         f"{r['environment']['date']}, commit {r['environment']['commit']}."
         if r.get("environment") else ""),
        f"Training: {r['training']['epochs_run']} epochs, best epoch {r['training']['best_epoch']}, "
        f"wall time {r['training']['wall_time_s']} s on {r['training']['threads']} thread(s), "
        f"{r['training']['precision']}.",
        "",
        "| evaluation | challenge score (mean F1 N/A/O) | 95% CI | F1 N | F1 A | F1 O | F1 ~ |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [("whole_record_windows", "whole record (mean over windows)"
             + (", fused with the rhythm features: the package" if r.get("fused") else "")),
            ("network_alone_whole_record", "network alone, whole record"),
            ("centre_window", "network alone, centre window only")]
    for key, label in rows:
        if key not in r or (key == "network_alone_whole_record" and not r.get("fused")):
            continue
        s = r[key]
        b = s["bootstrap"]
        f = s["f1"]
        lines.append(f"| {label} | {s['score']:.3f} | {b['ci_low']:.3f}–{b['ci_high']:.3f} | "
                     f"{f['N']:.3f} | {f['A']:.3f} | {f['O']:.3f} | {f['~']:.3f} |")
    lines += ["", f"Confusion (whole record; rows true, columns predicted, order "
                  f"{r['whole_record_windows']['classes']}): "
                  f"{r['whole_record_windows']['confusion']}",
              f"Prediction: {r['predict_seconds_per_record']} s per record.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
