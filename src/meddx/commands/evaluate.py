"""Evaluation commands: evaluate, explain, compare."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from meddx.errors import ConfigError

__all__ = ["register", "evaluate", "validate", "explain", "compare"]

logger = logging.getLogger(__name__)
console = Console()

_SHOWN = ("auroc", "auprc", "sensitivity", "specificity", "ppv", "npv", "accuracy",
          "balanced_accuracy", "brier", "qwk", "mae_grade", "mae", "rmse")


def evaluate(
    model: Path = typer.Argument(..., help="Model package folder (runs/x/model)."),
    dataset: str | None = typer.Option(None, "--dataset", "-d",
                                       help="Catalog dataset (default: the training dataset)."),
    split: str = typer.Option("test", "--split", "-s", help="Split to evaluate."),
    out: Path | None = typer.Option(None, "--out", "-o",
                                    help="Folder for report.html, metrics.json and card.json."),
    config: Path | None = typer.Option(None, "--config", "-c",
                                       help="Experiment YAML to read the data with."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples for the 95% CIs (0: none)."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
    no_subgroups: bool = typer.Option(False, "--no-subgroups", help="Skip subgroup analysis."),
    no_explain: bool = typer.Option(False, "--no-explain",
                                    help="Error gallery without Grad-CAM pictures."),
) -> None:
    """Evaluate a model: metrics with 95% CIs, operating points, calibration, conformal
    coverage, subgroups, error gallery; writes the HTML report with --out."""
    from meddx.evaluation.evaluator import evaluate as run
    from meddx.reporting.report import fmt_ci

    out = out or model.parent / "eval"
    result = run(model, dataset=dataset, split=split, out=out, config=config,
                 bootstrap=bootstrap, subgroups=not no_subgroups, seed=seed,
                 explain=not no_explain)
    table = Table(title=f"{result.model['name']} on {result.dataset} ({split}, n={result.n})")
    table.add_column("metric")
    table.add_column("value (95% CI)", justify="right")
    for key in _SHOWN:
        if key in result.metrics:
            table.add_row(key, fmt_ci(result.metrics[key]))
    console.print(table)
    if result.conformal.get("coverage") is not None:
        console.print(f"conformal coverage {100 * result.conformal['coverage']:.1f}% "
                      f"(target {100 * result.conformal['target_coverage']:.0f}%)")
    if result.subgroups is not None and result.subgroups.flagged:
        groups = sorted({f"{r['column']}={r['group']}" for r in result.subgroups.flagged})
        console.print(f"[yellow]subgroups below overall:[/] {escape(', '.join(groups))}")
    console.print(f"report: {result.report}")


def validate(
    model: Path = typer.Argument(..., help="Model package folder (runs/x/model)."),
    data: Path = typer.Argument(..., help="External data: a CSV path,label (or a folder with "
                                "labels.csv); ICU models: a PhysioNet 2012 folder with its "
                                "Outcomes file; or any dataset file `meddx evaluate` reads "
                                "(e.g. a MedMNIST .npz)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for report.html and metrics.json."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples for the 95% CIs."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
    explain: bool = typer.Option(False, "--explain", help="Attributions in the error gallery."),
    split: str = typer.Option("test", "--split", "-s", help="For a dataset file with splits "
                              "(e.g. a MedMNIST .npz): the split to validate on."),
) -> None:
    """External validation: evaluate a model on data from somewhere else; the report is marked
    external and adds calibration-in-the-large, calibration slope and whether each operating
    point still keeps its promise."""
    from meddx.evaluation.external import validate as run
    from meddx.reporting.report import fmt_ci

    result = run(model, data, out=out, bootstrap=bootstrap, seed=seed, explain=explain,
                 split=split)
    table = Table(title=f"{result.model['name']}: external validation on {result.dataset} "
                        f"(n={result.n})")
    table.add_column("metric")
    table.add_column("value (95% CI)", justify="right")
    for key in _SHOWN:
        if key in result.metrics:
            table.add_row(key, fmt_ci(result.metrics[key]))
    cal = result.external.get("calibration")
    if cal:
        table.add_row("calibration-in-the-large", fmt_ci(cal["intercept"]))
        table.add_row("calibration slope", fmt_ci(cal["slope"]))
    console.print(table)
    dropped = result.data.get("dropped_lines")
    if dropped and dropped.get("total"):
        why = ", ".join(f"{dropped['reasons'].get(k, k)}: {n}"
                        for k, n in dropped["by_reason"].items())
        console.print(escape(f"lines left out while reading: {dropped['total']} ({why})"))
    left = result.data.get("info", {}).get("left_out_cases")
    if left:
        console.print(f"cases left out (unreadable): {left}")
    for w in result.external["warnings"]:
        console.print(f"[yellow]warning:[/] {escape(w)}")
    console.print(f"report: {result.report}")


def _explained_class(predictor: Any, sample: Any, name: str | None) -> int:
    names = predictor.task.class_names
    if name is not None:
        if name not in names:
            raise ConfigError(f"unknown class '{name}'; the model's classes are {names}")
        return names.index(name)
    pred = predictor.predict_samples([sample])[0]
    target = pred.decision if isinstance(pred.decision, str) and pred.decision in names \
        else pred.label
    if isinstance(target, str) and target in names:
        return names.index(target)
    if isinstance(target, list) and target:  # multilabel: the first label called present
        return names.index(target[0])
    return int(max(range(len(names)), key=lambda k: pred.probabilities[names[k]]))


def explain(
    model: Path = typer.Argument(..., help="Model package folder."),
    source: str | None = typer.Argument(None, help="Input file (image, DICOM, NIfTI, record …); "
                                        "or use --smiles / --sequence."),
    out: Path = typer.Option(..., "--out", "-o", help="PNG to write."),
    smiles: str | None = typer.Option(None, "--smiles", help="A SMILES string (models that read SMILES)."),
    sequence: str | None = typer.Option(None, "--sequence",
                                        help="A DNA sequence (sequence models)."),
    method: str = typer.Option("gradcam", help="gradcam or gradcampp (images)."),
    layer: str | None = typer.Option(None, help="Target layer (images; default per network)."),
    class_name: str | None = typer.Option(None, "--class",
                                          help="Class to explain (default: the model's call)."),
) -> None:
    """Explain one prediction: a Grad-CAM overlay for images, the modality's attribution plot
    for other inputs.

    Examples:\n
      meddx explain runs/breast/model scan1.png --out scan1_cam.png\n
      meddx explain runs/splice/model --sequence CCAGCTGCATCACAGG… --out ism.png\n
      meddx explain runs/tox21/model --smiles "CCO" --out atoms.png
    """
    from meddx.commands.inputs import check_flags, one_input
    from meddx.inference import load_model
    from meddx.models.explain import combined_explainer

    chosen = one_input(source, smiles, sequence)
    predictor = load_model(model, backend="torch")
    card = predictor.card
    check_flags(card, smiles, sequence)
    sample = predictor.read(chosen)
    index = _explained_class(predictor, sample, class_name)
    options: dict[str, Any] = {"task": card.task, "network": card.network.get("name")}
    if layer is not None:
        options["layer"] = layer
    if method != "gradcam":
        options["method"] = method
    try:
        explainer = combined_explainer(predictor.modality, predictor.model, card.preprocessing,
                                       **options)
    except TypeError as e:
        raise ConfigError(f"the {card.modality} explainer takes no --layer / --method",
                          hint="leave them out for this model") from e
    attribution = explainer.explain(sample, index)
    path = explainer.plot(sample, attribution, out)
    notes = [f"layer {explainer.layer}"] if getattr(explainer, "layer", None) else []
    if hasattr(explainer, "averaged"):  # an ensemble or TTA package
        notes.append(explainer.describe())
    where = f" ({'; '.join(notes)})" if notes else ""
    console.print(escape(f"explained '{card.task.class_names[index]}'{where}: {path}"))


def compare(
    model_a: Path = typer.Argument(..., help="First model package."),
    model_b: Path = typer.Argument(..., help="Second model package."),
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="Catalog dataset."),
    split: str = typer.Option("test", "--split", "-s", help="Split both are scored on."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Paired comparison: DeLong's test of the AUROCs, McNemar's test at the operating points."""
    from meddx.evaluation.comparison import compare_models

    result = compare_models(model_a, model_b, dataset=dataset, split=split)
    if as_json:
        console.print_json(json.dumps(result))
        return
    a, b = result["model_a"]["name"], result["model_b"]["name"]
    table = Table(title=f"{a} (A) vs {b} (B) on {result['dataset']} ({split}, n={result['n']})")
    for col in ("class", "AUROC A", "AUROC B", "A - B (95% CI)", "DeLong p"):
        table.add_column(col, justify="right" if col != "class" else "left")
    for name, d in result["delong"].items():
        table.add_row(name, f"{d['auroc_a']:.3f}", f"{d['auroc_b']:.3f}",
                      f"{d['difference']:+.3f} ({d['low']:+.3f} to {d['high']:+.3f})",
                      f"{d['p_value']:.4f}")
    console.print(table)
    m = result["mcnemar"]
    kind = "exact binomial" if m["exact"] else "chi-square, continuity-corrected"
    console.print(f"McNemar ({kind}): A right & B wrong {m['a_only']}, B right & A wrong "
                  f"{m['b_only']}, p = {m['p_value']:.4f}")


def register(app: typer.Typer) -> None:
    """Add evaluate, explain and compare to ``app``."""
    app.command("evaluate")(evaluate)
    app.command("validate")(validate)
    app.command("explain")(explain)
    app.command("compare")(compare)
