"""How well the packaged OOD detector of the BreastMNIST demo model tells foreign inputs apart.

Trains ``configs/breastmnist-demo.yaml`` (the ``make demo`` recipe, 28 px; or reuses ``--model``),
then scores the breast **test** split (in distribution, never used in fitting) against
RetinaMNIST test images, ISIC 2017 test images and the DICOM CT/MR slices, each converted to
the model's input (grayscale, 28 px, 0..255). Reported per detector: AUROC of in vs out, the
share of each foreign set flagged, and the false-alarm rate on the breast test split against
the target the threshold was chosen for on calib. Same-run baselines: the energy score and the
maximum softmax probability (Hendrycks & Gimpel 2017), thresholded on calib the same way.

Second table (issue 24 point 5): the false-alarm rate realised on the **test** splits of three
models (image: the BreastMNIST demo recipe; ECG: PhysioNet 2017; ICU: PhysioNet 2012, shortened
trainings) with a Clopper-Pearson 95% CI, for the threshold on calib alone (the old scheme) and
on calib pooled with 5-fold cross-fitted train scores (the new default), beside the interval
the conformal guarantee expects from n (:func:`meddx.statistics.ood.false_alarm_distribution`),
and the energy score (calib-only) as the detector of networks without a linear head.

    nice -n 10 python benchmarks/ood.py            # trains the three models (about an hour)
    python benchmarks/ood.py --model runs/demo/model --ecg runs/ecg/model --icu runs/icu/model
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import environment, write

DATA = Path("/work/shared/data")


def _gray28(img: Any) -> np.ndarray:
    from PIL import Image

    im = img if isinstance(img, Image.Image) else Image.fromarray(img)
    return np.asarray(im.convert("L").resize((28, 28), Image.BILINEAR), dtype=np.uint8)


def foreign_sets(root: Path, isic_n: int) -> dict[str, list[np.ndarray]]:
    import pydicom
    from PIL import Image

    with np.load(root / "medmnist/retinamnist.npz") as d:
        retina = [_gray28(x) for x in d["test_images"]]
    isic_dir = root / "dermoscopy/isic2017/ISIC-2017_Test_v2_Data"
    files = sorted(isic_dir.glob("*.jpg"))[:isic_n]
    isic = [_gray28(Image.open(f)) for f in files]
    dicom = []
    for name in ("CT_small.dcm", "MR_small.dcm"):
        a = pydicom.dcmread(root / "dicom" / name).pixel_array.astype(np.float64)
        a = (255 * (a - a.min()) / max(a.max() - a.min(), 1e-9)).astype(np.uint8)
        dicom.append(_gray28(a))
    return {"RetinaMNIST test": retina, "ISIC 2017 test": isic, "DICOM CT+MR": dicom}


def scores(predictor: Any, arrays: list[np.ndarray] | Any) -> dict[str, np.ndarray]:
    """Mahalanobis, energy and MSP scores (higher = more foreign)."""
    import torch

    from meddx.modalities.base import Split
    from meddx.statistics.ood import energy_score

    if isinstance(arrays, list):
        tensors = [predictor.read(a).tensor for a in arrays]
        arrays = Split(name="x", inputs=tensors, targets=np.zeros(len(tensors)),
                       ids=[str(i) for i in range(len(tensors))])
    z, f = predictor.split_outputs(arrays, features=True)
    p = predictor.task.probabilities(torch.from_numpy(z)).numpy()
    return {"mahalanobis": predictor.detector.scorer.score(f), "energy": energy_score(z),
            "msp": -p.max(axis=1)}


# shortened trainings: the false-alarm rate is a property of the detector's calibration, not of
# the classifier's accuracy (stated in the results file)
SHORT = {
    "image": ("configs/breastmnist-demo.yaml", {"train.epochs": 3, "evaluation.bootstrap": 0}),
    "ecg": ("configs/physionet2017.yaml", {"train.epochs": 1, "train.max_minutes": 15,
                                           "model.options.widths": [32, 64, 128, 256],
                                           "evaluation.bootstrap": 0}),
    "icu": ("configs/physionet2012.yaml", {"train.epochs": 2, "model.options.members": 1,
                                           "evaluation.bootstrap": 0}),
}


def trained(name: str, folder: str | None, out: str, epochs: int | None = None) -> tuple[Any, float]:
    """The package at ``folder``, or one trained with the shortened recipe (seconds taken)."""
    from meddx.config import load_config
    from meddx.package import load_package
    from meddx.training import train

    if folder:
        return load_package(folder), 0.0
    path, over = SHORT[name]
    if epochs:
        over = {**over, "train.epochs": epochs}
    start = time.perf_counter()
    package = train(load_config(path).updated(**over), out=f"{out}/{name}", progress=False)
    return package, time.perf_counter() - start


def _rate(flags: np.ndarray) -> dict[str, Any]:
    from scipy.stats import binomtest

    k, n = int(flags.sum()), len(flags)
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return {"flagged": k, "n": n, "rate": k / n, "ci95": [float(ci.low), float(ci.high)]}


def false_alarms(package: Any, folds: int = 5) -> dict[str, Any]:
    """Test-split false alarms of calib-only vs calib+cross-fitted thresholds (and energy)."""
    from meddx.inference import Predictor
    from meddx.modalities.loading import load_bundle
    from meddx.statistics.ood import (
        MahalanobisScorer,
        crossfit_scores,
        energy_score,
        false_alarm_distribution,
        false_alarm_threshold,
        pool_scores,
    )
    from meddx.training.ood import _classes

    spec = package.card.ood
    rate = spec.false_alarm
    bundle = load_bundle(package.card.training["config"])
    predictor = Predictor(package, backend="torch")
    out = {s: predictor.split_outputs(bundle.splits[s], features=True)
           for s in ("train", "calib", "test")}
    train = bundle.splits["train"]
    classes = _classes(package, np.asarray(train.targets))
    rows: dict[str, Any] = {}
    pools: dict[str, tuple[np.ndarray, np.ndarray]] = {
        "energy, calib": (energy_score(out["calib"][0]), energy_score(out["test"][0]))}
    if spec.method == "mahalanobis":
        scorer = MahalanobisScorer().fit(out["train"][1], classes)
        calib, test = scorer.score(out["calib"][1]), scorer.score(out["test"][1])
        groups = None if train.patient_ids is None else np.asarray(train.patient_ids)
        oof, _ = crossfit_scores(out["train"][1], classes, folds, seed=0, groups=groups)
        pools = {"mahalanobis, calib": (calib, test),
                 f"mahalanobis, calib + {folds}-fold train": (np.r_[calib, oof], test), **pools}
        _, auto, rows["shift_p"] = pool_scores(calib, oof, "auto")
        rows["auto"] = "calib + train" if auto == "crossfit" else "calib"
    for name, (pool, test) in pools.items():
        thr = false_alarm_threshold(pool, rate)
        d = false_alarm_distribution(len(pool), rate)
        rows[name] = {"threshold": thr, "n_threshold": len(pool),
                      "expected": [d["low"], d["high"]], "test": _rate(test > thr),
                      "calib_flagged": float(np.mean(pool[:len(bundle.splits["calib"])] > thr))}
    if spec.threshold_scores == "crossfit" and spec.folds == folds:  # the packaged one
        assert np.isclose(rows[f"mahalanobis, calib + {folds}-fold train"]["threshold"],
                          spec.threshold, rtol=1e-5), "packaged threshold differs"
    return {"model": package.card.name, "method": spec.method, "target": rate,
            "n_train": len(train), "n_calib": len(bundle.splits["calib"]),
            "n_test": len(bundle.splits["test"]),
            "epochs_run": package.card.training.get("epochs_run"), "rows": rows}


def false_alarm_lines(results: dict[str, Any], seconds: dict[str, float]) -> list[str]:
    """The markdown table of :func:`false_alarms` over models."""
    lines = ["", "## False alarms on the test splits: calib-only vs cross-fitted threshold", "",
             "Realised false-alarm rate = share of the in-distribution **test** split flagged, "
             "with a Clopper-Pearson 95% CI, against the 5% target. *Expected*: the central 95% "
             "of the realised rate that the conformal guarantee gives a threshold resting on n "
             "exchangeable scores (Beta(n+1-k, k), k = ceil((n+1)(1-a))). *Calib above*: share "
             "of calib scores above the threshold. *Shift p*: Mann-Whitney test of calib vs "
             "out-of-fold train scores (a small p says the train scores are not exchangeable "
             "with new data, e.g. a network that memorised its training cases).", "",
             "| model | detector, threshold scores | n | threshold | expected FA (95%) | "
             "test FA (95% CI) | calib above |", "|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        for name, row in r["rows"].items():
            if name in ("shift_p", "auto"):
                continue
            t = row["test"]
            lines.append(
                f"| {key} ({r['model']}) | {name} | {row['n_threshold']} | "
                f"{row['threshold']:.4g} | {row['expected'][0]:.1%}-{row['expected'][1]:.1%} | "
                f"**{t['rate']:.1%}** ({t['ci95'][0]:.1%}-{t['ci95'][1]:.1%}; "
                f"{t['flagged']}/{t['n']}) | {row['calib_flagged']:.1%} |")
    lines.append("")
    for key, r in results.items():
        shift = r["rows"].get("shift_p")
        lines.append(f"- {key}: {r['method']} detector; train n={r['n_train']}, calib "
                     f"n={r['n_calib']}, test n={r['n_test']}; {r['epochs_run']} epochs run"
                     + (f", trained in {seconds[key]:.0f} s" if seconds.get(key) else "")
                     + ("" if shift is None else f"; shift p (calib vs out-of-fold train) "
                        f"= {shift:.3g}, so the default (`auto`) thresholds on "
                        f"{r['rows']['auto']}"))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="an already trained BreastMNIST package")
    ap.add_argument("--out", default="runs/ood-demo")
    ap.add_argument("--isic", type=int, default=600, help="ISIC test images used")
    ap.add_argument("--epochs", type=int, help="override train.epochs of the demo recipe")
    ap.add_argument("--ecg", help="an already trained PhysioNet 2017 package")
    ap.add_argument("--icu", help="an already trained PhysioNet 2012 package")
    ap.add_argument("--skip", nargs="*", default=[], choices=["ecg", "icu"],
                    help="leave these models out of the false-alarm table")
    args = ap.parse_args()
    from meddx.inference import Predictor
    from meddx.modalities.loading import load_bundle
    from meddx.statistics.ood import detector_auroc, false_alarm_threshold

    load_before = os.getloadavg()[0]
    package, train_s = trained("image", args.model, args.out, args.epochs)
    packages = {"image": (package, train_s)}
    for name in ("ecg", "icu"):
        if name not in args.skip:
            packages[name] = trained(name, getattr(args, name), args.out)
    seconds = {k: v[1] for k, v in packages.items()}
    fa = {k: false_alarms(p) for k, (p, _) in packages.items()}
    spec = package.card.ood
    assert spec is not None and spec.method == "mahalanobis", "package has no Mahalanobis detector"
    bundle = load_bundle(package.card.training["config"])
    predictor = Predictor(package, backend="torch")
    calib = scores(predictor, bundle.splits["calib"])
    test = scores(predictor, bundle.splits["test"])
    foreign = {name: scores(predictor, arrs) for name, arrs in
               foreign_sets(DATA, args.isic).items()}
    rate = spec.false_alarm
    rows: dict[str, Any] = {}
    for key in ("mahalanobis, calib", "mahalanobis (packaged)", "energy", "msp"):
        method = key.split(",")[0].split(" ")[0]
        thr = spec.threshold if "packaged" in key else false_alarm_threshold(calib[method], rate)
        row = {"threshold": thr, "test_false_alarm": float(np.mean(test[method] > thr)),
               "sets": {}}
        for name, s in foreign.items():
            row["sets"][name] = {"n": len(s[method]),
                                 "auroc": detector_auroc(test[method], s[method]),
                                 "flagged": float(np.mean(s[method] > thr))}
        rows[key] = row
    env = environment()
    result = {"env": env, "model": {"name": package.card.name, "sha256": package.sha256,
                                    "config": "configs/breastmnist-demo.yaml", "seed": 0,
                                    "train_s": round(train_s, 1)},
              "detector": spec.model_dump(mode="json"),
              "n_test": int(len(test["mahalanobis"])), "n_calib": int(len(calib["mahalanobis"])),
              "target_false_alarm": rate, "results": rows, "false_alarm": fa,
              "short_recipes": {k: {"config": c, "overrides": o} for k, (c, o) in SHORT.items()}}
    names = list(foreign)
    lines = [
        "# OOD detection: BreastMNIST demo model against foreign images", "",
        f"CPU: {env['cpu']} ({env['threads']} threads); commit {env['commit']}; model "
        f"`configs/breastmnist-demo.yaml` (seed 0, ResNet-18, 28 px; "
        f"{package.card.training.get('epochs_run', '?')} epochs run), "
        + (f"trained in {train_s:.0f} s" if train_s else "a package trained earlier (`--model`)")
        + f". Detector: {spec.method} on `{spec.layer}` input "
        f"({spec.feature_dim} features), Gaussians fitted on train (n={spec.n_fit}); threshold "
        f"for a {rate:.0%} false-alarm rate on calib alone (n={spec.n_calib}, the scheme before "
        f"issue 24) or, packaged, on calib + {spec.folds}-fold cross-fitted train scores "
        f"(n={spec.n_threshold}). In distribution: "
        f"the breast test split (n={result['n_test']}). Foreign inputs converted to the "
        "model's input (grayscale, 28 px, 0..255). Baselines (same run, same calib "
        "thresholding): energy score, maximum softmax probability (MSP).", "",
        "| detector | FA on breast test (target " + f"{rate:.0%})" + " | " +
        " | ".join(f"AUROC {n} (n={rows['energy']['sets'][n]['n']}) | flagged {n}"
                   for n in names) + " |",
        "|---|---|" + "---|---|" * len(names)]
    for method, row in rows.items():
        cells = " | ".join(f"{row['sets'][n]['auroc']:.3f} | {row['sets'][n]['flagged']:.1%}"
                           for n in names)
        lines.append(f"| {method} | {row['test_false_alarm']:.1%} | {cells} |")
    lines += ["", "DICOM CT+MR holds two slices (CT_small, MR_small): its AUROC rests on two "
              "images; the flagged share says whether each was caught."]
    lines += false_alarm_lines(fa, seconds)
    lines += ["", "Shortened trainings (the false-alarm rate is a property of the detector's "
              "calibration, not of the classifier's accuracy): " + "; ".join(
                  f"{k}: `{c}` with {', '.join(f'{a}={b}' for a, b in o.items())}"
                  for k, (c, o) in SHORT.items()) + ".",
              f"Load average before: {load_before:.2f}; after: {os.getloadavg()[0]:.2f} "
              "(2 cores shared with other work).",
              "Reproduce: `nice -n 10 python benchmarks/ood.py` (trains the three models; "
              "`--model DIR --ecg DIR --icu DIR` reuse trained ones).", ""]
    write("ood", result, "\n".join(lines))


if __name__ == "__main__":
    main()
