"""PhysioNet/CinC 2017: do RR-interval / HRV features and F1 thresholds add to the network?

Takes a package trained with the shipped recipe (``benchmarks/physionet2017.py --out DIR``) and
asks, without touching the test split until the choice is made:

  cnn           the network alone (whole record: mean over 30-s windows, argmax)
  cnn+bias      the network with per-class logit offsets fitted for the challenge F1
  fused         multinomial logistic regression over [network logits, rhythm features]
  stacked       logistic regression over [network logits, log-probabilities of a gradient-
                boosted model trained on the rhythm features of the *train* split]
  …+bias        either of them with F1 offsets

The rhythm features (`meddx.modalities.ecg.rhythm`: RR statistics, HRV, irregularity,
Poincaré, P-wave and template-correlation morphology, detector agreement) are computed from the
300-Hz records. Every arm that fits anything is fitted on the calibration split (records the
network never trained on) and compared by repeated stratified K-fold cross-validation *inside
calib*; the arm with the best mean CV score is then fitted on all of calib and read on the test
split ONCE, beside the network alone, with a paired bootstrap CI of the difference.

    python benchmarks/physionet2017.py --out runs/p17            # train the recipe (~25 min)
    python benchmarks/physionet2017_rr.py --model runs/p17/model  # this comparison (~6 min)

Writes ``benchmarks/results/physionet2017_rr.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment, write  # noqa: E402

SCORED = (0, 1, 2)  # N, A, O in the recipe's class order (checked below)


def fast_score(y: np.ndarray, p: np.ndarray, k: int = 4) -> float:
    """The challenge score (mean F1 of N, A, O) from index arrays, without sklearn."""
    cm = np.bincount(y * k + p, minlength=k * k).reshape(k, k)
    f1 = [2 * cm[i, i] / max(1, cm[i].sum() + cm[:, i].sum()) for i in SCORED]
    return float(np.mean(f1))


def fit_offsets(z: np.ndarray, y: np.ndarray, grid: np.ndarray | None = None,
                passes: int = 3) -> np.ndarray:
    """Per-class additive logit offsets (class 0 fixed at 0) maximising the challenge score,
    by coordinate ascent over a grid; ties keep the offset nearest 0."""
    grid = np.linspace(-3, 3, 61) if grid is None else grid
    b = np.zeros(z.shape[1])
    for _ in range(passes):
        for c in range(1, z.shape[1]):
            scores = []
            for g in grid:
                b2 = b.copy()
                b2[c] = g
                scores.append(fast_score(y, (z + b2).argmax(1), z.shape[1]))
            scores = np.asarray(scores)
            best = np.flatnonzero(scores >= scores.max() - 1e-12)
            b[c] = grid[best[np.argmin(np.abs(grid[best]))]]
    return b


class Arm:
    """One way of turning [logits, features, gbm log-probs] into a class; fit on calib rows."""

    def __init__(self, name: str, use: str, bias: bool) -> None:
        self.name, self.use, self.bias = name, use, bias

    def _design(self, z: np.ndarray, feats: np.ndarray, gbm: np.ndarray) -> np.ndarray:
        if self.use == "cnn":
            return z
        if self.use == "fused":
            return np.column_stack([z, feats])
        return np.column_stack([z, gbm])

    def fit(self, z: np.ndarray, feats: np.ndarray, gbm: np.ndarray, y: np.ndarray) -> Arm:
        from sklearn.linear_model import LogisticRegression

        x = self._design(z, feats, gbm)
        self.lr = None
        if self.use != "cnn":
            self.med = np.nanmedian(x, axis=0)
            x = np.where(np.isnan(x), self.med, x)
            self.mu, self.sd = x.mean(0), x.std(0) + 1e-9
            self.lr = LogisticRegression(C=1.0, max_iter=5000).fit((x - self.mu) / self.sd, y)
        self.b = fit_offsets(self.scores(z, feats, gbm, raw=True), y) if self.bias else 0.0
        return self

    def scores(self, z: np.ndarray, feats: np.ndarray, gbm: np.ndarray,
               raw: bool = False) -> np.ndarray:
        x = self._design(z, feats, gbm)
        if self.lr is not None:
            x = np.where(np.isnan(x), self.med, x)
            s = self.lr.predict_log_proba((x - self.mu) / self.sd)
        else:
            s = x
        return s if raw else s + self.b

    def predict(self, z: np.ndarray, feats: np.ndarray, gbm: np.ndarray) -> np.ndarray:
        return self.scores(z, feats, gbm).argmax(1)


ARMS = [Arm("cnn", "cnn", False), Arm("cnn+bias", "cnn", True), Arm("fused", "fused", False),
        Arm("fused+bias", "fused", True), Arm("stacked", "stacked", False),
        Arm("stacked+bias", "stacked", True)]


def _features(folder: Path, ids: list[str]) -> tuple[np.ndarray, float]:
    """Rhythm features of ``ids`` (per-record cache under ~/.cache/meddx/ecg), and the
    seconds per record of computing them afresh (timed on up to 100 records)."""
    from meddx.modalities.ecg.rhythm import cached_features, features_table

    x = cached_features(folder, ids)
    sample = ids[:100]
    start = time.perf_counter()
    features_table([folder / i for i in sample], progress=False)
    return x, (time.perf_counter() - start) / max(1, len(sample))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="package trained with the shipped recipe")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="physionet2017_rr")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from meddx.config import ExperimentConfig
    from meddx.inference import load_model
    from meddx.modalities.ecg.rhythm import FEATURES
    from meddx.modalities.ecg.score import bootstrap_challenge_score, challenge_score
    from meddx.training import load_bundle

    predictor = load_model(args.model)
    cfg = ExperimentConfig.model_validate(predictor.card.training["config"])
    bundle = load_bundle(cfg)
    task = predictor.task
    classes = [str(v) for v in (task.label_values or task.class_names)]
    if classes[:3] != ["N", "A", "O"]:
        raise SystemExit(f"expected classes N, A, O, ~ in that order, got {classes}")
    folder = Path(bundle.info["source"])
    sp = {k: bundle.splits[k] for k in ("train", "calib", "test")}
    y = {k: task.target_index(s.targets) for k, s in sp.items()}
    feats = {k: _features(folder, list(s.ids))[0] for k, s in sp.items()}
    spr = _features(folder, list(sp["test"].ids))[1]
    print(f"rhythm features: {sum(len(v) for v in feats.values())} records, "
          f"{spr * 1000:.1f} ms/record", flush=True)

    # the rhythm features alone: a gradient-boosted model, 5-fold CV on train (information)
    gbm = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, random_state=0)
    oof = cross_val_predict(gbm, feats["train"], y["train"], cv=StratifiedKFold(5, shuffle=True,
                            random_state=0), method="predict")
    gbm_cv = fast_score(y["train"], oof)
    gbm.fit(feats["train"], y["train"])
    gl = {k: np.log(np.clip(gbm.predict_proba(feats[k]), 1e-6, 1)) for k in ("calib", "test")}
    print(f"rhythm features alone (GBM, 5-fold CV on train): {gbm_cv:.3f}", flush=True)

    t0 = time.perf_counter()
    z = {k: predictor.record_logits(sp[k]) for k in ("calib", "test")}
    t_logits = time.perf_counter() - t0

    # choose on repeated K-fold CV inside calib
    zc, fc, gc, yc = z["calib"], feats["calib"], gl["calib"], y["calib"]
    cv: dict[str, list[float]] = {a.name: [] for a in ARMS}
    for rep in range(args.repeats):
        folds = StratifiedKFold(args.folds, shuffle=True, random_state=rep).split(zc, yc)
        pred = {a.name: np.zeros_like(yc) for a in ARMS}
        for tr, te in folds:
            for a in ARMS:
                a.fit(zc[tr], fc[tr], gc[tr], yc[tr])
                pred[a.name][te] = a.predict(zc[te], fc[te], gc[te])
        for a in ARMS:
            cv[a.name].append(fast_score(yc, pred[a.name]))
    cv_summary = {k: {"mean": float(np.mean(v)), "sd": float(np.std(v)), "runs": v}
                  for k, v in cv.items()}
    for k, v in cv_summary.items():
        print(f"CV in calib  {k:14s} {v['mean']:.3f} ± {v['sd']:.3f}", flush=True)
    chosen = max(ARMS, key=lambda a: cv_summary[a.name]["mean"])
    base = ARMS[0]

    # the test split, once: the chosen arm (fitted on all of calib) beside the network alone
    chosen.fit(zc, fc, gc, yc)
    base.fit(zc, fc, gc, yc)
    yt = y["test"]
    p_chosen = chosen.predict(z["test"], feats["test"], gl["test"])
    p_base = base.predict(z["test"], feats["test"], gl["test"])
    rng = np.random.default_rng(0)
    diffs = []
    for _ in range(args.bootstrap):
        i = rng.integers(0, yt.size, yt.size)
        diffs.append(fast_score(yt[i], p_chosen[i]) - fast_score(yt[i], p_base[i]))
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    test = {}
    for name, p in (("cnn", p_base), (chosen.name, p_chosen)):
        s = challenge_score(yt, p, classes)
        s["bootstrap"] = bootstrap_challenge_score(yt, p, classes, n_boot=args.bootstrap)
        test[name] = s
    result = {
        "benchmark": "physionet2017_rr", "package": str(args.model),
        "n": {k: int(len(v)) for k, v in y.items()},
        "features": FEATURES, "feature_ms_per_record": round(spr * 1000, 1),
        "logits_wall_s": round(t_logits, 1),
        "gbm_alone_cv_train": gbm_cv, "cv_in_calib": cv_summary,
        "folds": args.folds, "repeats": args.repeats, "chosen": chosen.name,
        "chosen_offsets": np.asarray(chosen.b).tolist() if chosen.bias else None,
        "test": test,
        "test_difference": {"estimate": test[chosen.name]["score"] - test["cnn"]["score"],
                            "ci_low": float(lo), "ci_high": float(hi)},
        "training": {k: predictor.card.training.get(k) for k in
                     ("epochs_run", "best_epoch", "wall_time_s", "threads", "precision")},
        "environment": environment(),
    }
    write(args.name, result, _markdown(result, classes))
    print(_markdown(result, classes))


def _markdown(r: dict[str, Any], classes: list[str]) -> str:
    env = r["environment"]
    lines = [
        "# PhysioNet/CinC 2017: rhythm features and F1 offsets beside the network",
        "",
        f"{env['cpu']}, {env['cores']} cores, torch {env['torch']}, load {env['load_avg']:.2f} "
        f"at the end; {env['date']}, commit {env['commit']}.",
        f"Network: the shipped recipe, trained {r['training']['epochs_run']} epochs (best "
        f"{r['training']['best_epoch']}) in {r['training']['wall_time_s']} s on "
        f"{r['training']['threads']} threads ({r['training']['precision']}); package "
        f"`{r['package']}`.",
        f"Splits: train {r['n']['train']}, calib {r['n']['calib']}, test {r['n']['test']} "
        "records (the recipe's fixed lists; calib carved from train, never trained on).",
        f"Rhythm features: {len(r['features'])} per record, {r['feature_ms_per_record']} ms per "
        "record (xqrs beats + an energy detector).",
        "",
        f"Rhythm features alone (gradient boosting, 5-fold CV on train): "
        f"**{r['gbm_alone_cv_train']:.3f}**.",
        "",
        f"## Choice: {r['repeats']}× repeated {r['folds']}-fold CV inside calib",
        "",
        "| arm | CV challenge score (mean ± sd over repeats) |",
        "|---|---|",
    ]
    for k, v in r["cv_in_calib"].items():
        mark = " (chosen)" if k == r["chosen"] else ""
        lines.append(f"| {k}{mark} | {v['mean']:.3f} ± {v['sd']:.3f} |")
    d = r["test_difference"]
    lines += ["", "## Test split, read once (whole record)", "",
              "| arm | challenge score | 95% CI | F1 N | F1 A | F1 O | F1 ~ |",
              "|---|---|---|---|---|---|---|"]
    for k, s in r["test"].items():
        b, f = s["bootstrap"], s["f1"]
        lines.append(f"| {k} | {s['score']:.3f} | {b['ci_low']:.3f}–{b['ci_high']:.3f} | "
                     f"{f['N']:.3f} | {f['A']:.3f} | {f['O']:.3f} | {f['~']:.3f} |")
    lines += ["", f"Difference, chosen − network alone: {d['estimate']:+.3f} (paired bootstrap "
                  f"95% CI {d['ci_low']:+.3f} to {d['ci_high']:+.3f}).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
