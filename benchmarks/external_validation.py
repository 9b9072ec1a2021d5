"""External validation of ICU mortality models: trained on PhysioNet 2012 set-a, validated on set-b.

Set-b is the other half of the same challenge (same hospitals' data, split by the organisers),
**not another hospital**: this measures the `meddx validate` path and how the figures move from
an internal test split to data the model never saw in any form, not transport across sites.

Two models, trained on set-a only (70/10/20 record split of set-a, calib carved from train):
a single GRU-D (the ICU recipe with ``members: 1`` and at most 20 epochs) and the logistic
baseline on summary features. Each is evaluated on its internal set-a test split (baseline,
same run) and validated on all of set-b with ``meddx.evaluation.external.validate``.

    nice -n 10 python benchmarks/external_validation.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from _common import environment, write

DATA = Path("/work/shared/data/ehr/physionet2012")


def _linked(half: str, root: Path) -> Path:
    """A folder holding only ``set-<half>`` and ``Outcomes-<half>.txt`` (symlinks)."""
    out = root / f"physionet2012-{half}"
    stays = out / f"set-{half}"
    if not stays.is_dir():
        stays.mkdir(parents=True)
        for f in (DATA / f"set-{half}").glob("*.txt"):
            (stays / f.name).symlink_to(f)
        (out / f"Outcomes-{half}.txt").symlink_to(DATA / f"Outcomes-{half}.txt")
    return out


def _config(name: str, path: Path, model: dict[str, Any], epochs: int) -> dict[str, Any]:
    return {
        "name": name, "seed": 0,
        "data": {"path": str(path), "modality": "ehr", "calib_fraction": 0.15,
                 "val_fraction": 0.1, "test_fraction": 0.2,
                 "options": {"on_malformed": "warn", "progress": False}},
        "model": model,
        "train": {"epochs": epochs, "batch_size": 64, "lr": 0.001, "weight_decay": 0.0001,
                  "optimizer": "adamw", "scheduler": "cosine", "early_stopping_patience": 5,
                  "monitor": "val_auroc", "threads": 1},
        "evaluation": {"default_operating_point": "sensitivity", "target_sensitivity": 0.8,
                       "target_specificity": 0.9, "bootstrap": 1000},
    }


def _row(res: Any) -> dict[str, Any]:
    m = res.metrics
    out = {"n": res.n, "auroc": m["auroc"], "auprc": m["auprc"], "brier": m.get("brier")}
    op = res.operating_points.get("sensitivity@0.8")
    if op:
        out["sensitivity@0.8"] = op["metrics"]["sensitivity"]
        out["specificity@0.8"] = op["metrics"]["specificity"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/external")
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args()
    from meddx.evaluation.evaluator import evaluate
    from meddx.evaluation.external import validate
    from meddx.modalities.loading import load_bundle
    from meddx.training import train

    out = Path(args.out)
    set_a, set_b = _linked("a", out), _linked("b", out)
    models = {"GRU-D (1 member)": {"name": "grud", "options": {
                  "hidden": 64, "dropout": 0.3, "pooling": "mean_max", "wide": True}},
              "logistic": {"name": "logistic"}}
    rows: dict[str, Any] = {}
    for label, model in models.items():
        slug = model["name"]
        cfg = _config(f"icu-{slug}-set-a", set_a, model, args.epochs)
        bundle = load_bundle(cfg)
        t0 = time.perf_counter()
        package = train(cfg, out=out / slug, progress=False, bundle=bundle)
        train_s = time.perf_counter() - t0
        internal = evaluate(package, split="test", bundle=bundle, report=False, explain=False,
                            subgroups=False, update_card=False)
        t0 = time.perf_counter()
        external = validate(package, set_b, out=out / f"{slug}-set-b", bootstrap=1000)
        validate_s = time.perf_counter() - t0
        rows[label] = {"train_s": round(train_s, 1), "validate_s": round(validate_s, 1),
                       "internal": _row(internal), "external": _row(external),
                       "transport": external.external,
                       "dropped_lines": external.data.get("dropped_lines"),
                       "ood": package.card.ood.model_dump(mode="json") if package.card.ood
                       else None}
    env = environment()
    write("external_validation", {"env": env, "rows": rows}, _markdown(env, rows, args))


def _ci(e: dict[str, Any] | None, d: int = 3) -> str:
    if not e:
        return "n/a"
    return f"{e['value']:.{d}f} ({e['low']:.{d}f}-{e['high']:.{d}f})"


def _markdown(env: dict[str, Any], rows: dict[str, Any], args: Any) -> str:
    lines = [
        "# External validation: ICU mortality, trained on set-a, validated on set-b", "",
        f"CPU: {env['cpu']} ({env['threads']} threads); commit {env['commit']}; seed 0. "
        "PhysioNet/CinC 2012: models trained on set-a only (70/10/20 split of set-a, calib "
        "carved from train); **set-b is the other half of the same challenge, not another "
        "hospital** — it checks the `meddx validate` path and how figures move to unseen "
        "stays, not transport across sites. Internal = set-a's test split (baseline, same run).",
        "",
        "| model | data | n | AUROC | AUPRC | Brier | sens@0.8 point: sensitivity | specificity |",
        "|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        for where in ("internal", "external"):
            x = r[where]
            lines.append(f"| {label} | {'set-a test' if where == 'internal' else 'set-b'} | "
                         f"{x['n']} | {_ci(x['auroc'])} | {_ci(x['auprc'])} | "
                         f"{_ci(x['brier'])} | {_ci(x.get('sensitivity@0.8'))} | "
                         f"{_ci(x.get('specificity@0.8'))} |")
    lines += ["", "Transport on set-b (95% bootstrap CIs, 1,000 resamples):", "",
              "| model | calibration-in-the-large | calibration slope | observed − predicted | "
              "operating points | warnings |", "|---|---|---|---|---|---|"]
    for label, r in rows.items():
        t = r["transport"]
        cal = t["calibration"] or {}
        promises = "; ".join(f"{p['operating_point']}: {p['status']}" for p in t["promises"])
        lines.append(f"| {label} | {_ci(cal.get('intercept'), 2)} | {_ci(cal.get('slope'), 2)} "
                     f"| {_ci(cal.get('observed_minus_expected'), 3)} | {promises} | "
                     f"{len(t['warnings'])}: {'; '.join(t['warnings']) or 'none'} |")
    dl = next(iter(rows.values()))["dropped_lines"] or {}
    if dl:
        reasons = ", ".join(f"{dl['reasons'].get(k, k)} {n}" for k, n in dl["by_reason"].items())
        lines += ["", f"Lines of set-b left out while reading: {dl['total']} ({reasons}); "
                  f"stays refused (nothing usable): {dl['refused_stays']['stays']}."]
    lines += ["", "Time: " + "; ".join(f"{k}: train {r['train_s']} s, validate {r['validate_s']} s"
                                     for k, r in rows.items()) + ".",
              "", "Reproduce: `nice -n 10 python benchmarks/external_validation.py` "
              f"(epochs {args.epochs}).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
