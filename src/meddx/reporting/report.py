"""The evaluation report: one self-contained HTML file (Jinja2; figures inline as base64 PNG).

Sections follow what a TRIPOD+AI / CLAIM reader looks for: intended use, data, model and
training, discrimination, operating points, calibration, conformal coverage, subgroups, error
gallery, limitations. A value that does not exist is shown as "n/a" with its reason, never as
nan or None.
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from meddx.reporting.figures import reliability_figure, roc_pr_figure, subgroup_figure

__all__ = ["write_report", "render_report", "fmt", "fmt_ci", "input_summary"]

logger = logging.getLogger(__name__)

_HEADLINE = ("auroc", "auprc", "sensitivity", "specificity", "ppv", "npv", "f1", "accuracy",
             "balanced_accuracy", "brier", "qwk", "mae_grade", "mae", "rmse", "r2")
_LABELS = {"auroc": "AUROC", "auprc": "AUPRC", "sensitivity": "Sensitivity",
           "specificity": "Specificity", "ppv": "PPV", "npv": "NPV", "f1": "F1",
           "accuracy": "Accuracy", "balanced_accuracy": "Balanced accuracy",
           "brier": "Brier score", "qwk": "Quadratic-weighted kappa",
           "mae_grade": "Mean absolute grade error", "mae": "MAE", "rmse": "RMSE", "r2": "R²"}


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and not math.isfinite(x))


def fmt(x: Any, digits: int = 3, pct: bool = False) -> str:
    """A number for the report; "n/a" for None/NaN."""
    if _missing(x):
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{100 * x:.1f}%" if pct else f"{x:.{digits}f}"
    return str(x)


def fmt_ci(entry: dict[str, float] | None, digits: int = 3) -> str:
    """``0.812 (0.751–0.866)``; the interval shown as n/a when it does not exist."""
    if not entry or _missing(entry.get("value")):
        return "n/a"
    value = fmt(entry["value"], digits)
    if _missing(entry.get("low")) or _missing(entry.get("high")):
        return f"{value} (CI n/a)"
    return f"{value} ({fmt(entry['low'], digits)}–{fmt(entry['high'], digits)})"


def _reasons(notes: list[str]) -> dict[str, str]:
    out = {}
    for n in notes:
        key, _, why = n.partition(": ")
        if why and key not in out:
            out[key] = why
    return out


def _metric_rows(result: Any) -> list[dict[str, Any]]:
    reasons = _reasons(result.notes)
    rows = []
    for key in _HEADLINE:
        if key in result.metrics:
            entry = result.metrics[key]
            rows.append({"name": _LABELS[key], "text": fmt_ci(entry),
                         "reason": reasons.get(key) if _missing(entry["value"]) else None})
    return rows


def _per_class_rows(result: Any) -> list[dict[str, Any]]:
    reasons = _reasons(result.notes)
    rows = []
    for name in result.task.class_names:
        cells = {}
        for key in ("auroc", "auprc", "sensitivity", "specificity"):
            entry = result.metrics.get(f"{key}[{name}]")
            if entry is not None:
                cells[key] = fmt_ci(entry)
                if _missing(entry["value"]) and f"{key}[{name}]" in reasons:
                    cells[key] += f" — {reasons[f'{key}[{name}]']}"
        if cells:
            rows.append({"name": name, **cells})
    return rows


def _subgroup_table(result: Any) -> list[dict[str, Any]]:
    """One row per subgroup, one cell per metric (value, CI, gap to overall, flag)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    if result.subgroups is None:
        return []
    for r in result.subgroups.rows:
        row = rows.setdefault((r["column"], r["group"]), {
            "column": r["column"], "group": r["group"], "n": r["n"], "positives": r["positives"],
            "warning": r["warning"], "cells": {}})
        row["cells"][r["metric"]] = {
            "text": fmt_ci({"value": r["value"], "low": r["low"], "high": r["high"]}),
            "gap": None if _missing(r["gap"]) else f"{r['gap']:+.3f}", "flag": r["flag"]}
    return list(rows.values())


def _limitations(result: Any) -> list[str]:
    card, data = result.card, result.data
    out = []
    if card is None or card.research_only:
        out.append("Research use only: this model is not a medical device and has not been "
                   "validated prospectively.")
    if not data.get("patient_level_split"):
        out.append("The data carry no patient identifiers: splits are by image/record, so one "
                   "patient may appear in both training and test data, which flatters the "
                   "figures.")
    positives = _positives(result)
    if result.n < 200 or (positives is not None and positives < 50):
        extra = f", {positives} positive" if positives is not None else ""
        out.append(f"The {result.split} split is small ({result.n} cases{extra}): the "
                   "confidence intervals are wide.")
    calib = data.get("splits", {}).get("calib", {}).get("n")
    if calib is not None and calib < 200:
        out.append(f"Temperature, thresholds and conformal sets were fitted on {calib} "
                   "calibration cases; they will move on new data.")
    if result.subgroups is not None and result.subgroups.split != result.split:
        out.append(f"Subgroups were analysed on the {result.subgroups.split} split, not on "
                   f"{result.split}.")
    if result.subgroups is None:
        out.append("No demographic metadata: performance across sex, age or site is unknown.")
    side = getattr(card, "side_inputs", None)
    if side is not None and side.inputs and (result.subgroups is None
                                             or result.subgroups.split != result.split):
        out.append(f"The {result.split} split carries no side inputs "
                   f"({', '.join(s.name for s in side.inputs)}): the model was scored with "
                   "every one of them missing (flagged to the model), which is not how it is "
                   "meant to be used.")
    if getattr(result, "external", None) is None:
        out.append("Single retrospective dataset; performance on other scanners, sites and "
                   "populations is unknown (external validation needed).")
    else:
        out.append("External validation on one dataset: it says how the model transports to "
                   "these data, not to every other site or population.")
    if "unconfirmed" in str(data.get("info", {}).get("license", "")).lower():
        out.append("The data license is unconfirmed; treat it as research use.")
    return out


def _tradeoff(result: Any) -> list[str]:
    """One line per operating point: alerts per 100 cases, how many of them are right, the
    share of positive cases caught, and the change against the default point."""
    ops = result.operating_points or {}
    pos = result.task.positive_class
    figures = {}
    for name, op in ops.items():
        m = op.get("metrics", {})
        vals = [m.get(k, {}).get("value") for k in ("alerts_per_100", "ppv", "sensitivity")]
        if not any(_missing(v) for v in vals[:1] + vals[2:]):
            figures[name] = vals
    default = next((n for n, op in ops.items() if op.get("default")), None)
    lines = []
    for name in sorted(figures, key=lambda n: n != default):
        alerts, ppv, sens = figures[name]
        right = "n/a" if _missing(ppv) else f"{alerts * ppv:.1f}"
        line = (f"{name}{' (default)' if name == default else ''}: {alerts:.1f} alerts per 100 "
                f"cases, {right} of them {pos} (PPV {fmt(ppv, 2)}); {sens:.0%} of {pos} cases "
                "alerted on")
        if default in figures and name != default:
            d_alerts, _, d_sens = figures[default]
            line += (f" — against the default, {alerts - d_alerts:+.1f} alerts per 100 for "
                     f"{100 * (sens - d_sens):+.0f} points of sensitivity")
        lines.append(line + ".")
    return lines


# what a long preprocessing entry is, in the report's words (others go by their key)
_INPUT_LABELS = {"stats": "normalisation (mean, SD)", "variables": "variables",
                 "static": "static variables", "layout": "channel layout"}
_INLINE_ITEMS = 4  # a list up to this long is shown inline; longer ones go to the appendix


def _scalar(x: Any) -> bool:
    return x is None or isinstance(x, str | int | float | bool)


def _inline(x: Any) -> bool:
    return _scalar(x) or (isinstance(x, list | tuple) and len(x) <= _INLINE_ITEMS
                          and all(_scalar(v) for v in x))


def _text(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, list | tuple):
        return ", ".join(_text(v) for v in x)
    return fmt(x)


def _leaves(x: Any, prefix: str = "") -> list[tuple[str, str]]:
    """``(name, value)`` rows of a nested entry: dicts and long lists are walked, scalars and
    short lists of scalars are one row (``series / HR`` → ``84.5, 15.2``)."""
    if _inline(x):
        return [(prefix, _text(x))]
    items = x.items() if isinstance(x, dict) else ((str(i + 1), v) for i, v in enumerate(x))
    return [row for k, v in items for row in _leaves(v, f"{prefix} / {k}" if prefix else str(k))]


def input_summary(preprocessing: dict[str, Any]) -> dict[str, Any]:
    """The card's preprocessing for the report: ``summary`` (short items inline; each long one
    as a count pointing to the appendix) and ``appendix`` (one table per long item)."""
    summary, appendix = [], []
    for key, value in preprocessing.items():
        if _inline(value):
            summary.append(f"{key} {_text(value)}")
            continue
        label = _INPUT_LABELS.get(key, key.replace("_", " "))
        rows = _leaves(value)
        if len(rows) <= _INLINE_ITEMS:  # a small dict: inline too
            summary.append(f"{key} (" + "; ".join(f"{n} {v}" for n, v in rows) + ")")
            continue
        if isinstance(value, list | tuple) and all(_scalar(v) for v in value):
            count = f"{label}: {len(value)}"
        else:
            count = f"{label} of {len(rows)} entries"
        summary.append(f"{count} (Appendix A.{len(appendix) + 1})")
        appendix.append({"key": key, "label": label, "rows": rows})
    return {"summary": summary, "appendix": appendix}


def _positives(result: Any) -> int | None:
    from meddx.statistics.metrics import binary_view

    view = binary_view(result.task, result.targets, result.probs) \
        if result.targets is not None else None
    return None if view is None else int(view[0].sum())


def _figures(result: Any) -> dict[str, str | None]:
    figs: dict[str, str | None] = {"roc_pr": None, "reliability": None, "subgroups": None}
    if result.task.kind != "regression":
        figs["roc_pr"] = roc_pr_figure(result.task, result.targets, result.probs,
                                       result.operating_points)
        figs["reliability"] = reliability_figure(result.calibration)
    if result.subgroups is not None and result.subgroups.rows:
        figs["subgroups"] = subgroup_figure(result.subgroups.rows, result.subgroups.metrics[0])
    return figs


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("meddx.reporting", "templates"),
                      autoescape=select_autoescape(["html", "j2"]), undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = fmt
    env.filters["ci"] = fmt_ci
    env.filters["pct"] = lambda x: fmt(x, pct=True)
    env.tests["missing"] = _missing
    return env


def render_report(result: Any) -> str:
    """The report's HTML for an :class:`~meddx.evaluation.evaluator.EvaluationResult`."""
    from meddx.version import __version__

    context = {
        "r": result, "card": result.card, "task": result.task, "data": result.data,
        "metric_rows": _metric_rows(result), "class_rows": _per_class_rows(result),
        "subgroup_table": _subgroup_table(result), "tradeoff": _tradeoff(result),
        "figures": _figures(result), "limitations": _limitations(result),
        "labels": _LABELS, "positives": _positives(result),
        "input": input_summary(result.card.preprocessing if result.card is not None else {}),
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "version": __version__,
    }
    return _environment().get_template("report.html.j2").render(**context)


def write_report(result: Any, path: str | Path) -> Path:
    """Render the report and write it to ``path``; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(result), encoding="utf-8")
    logger.info("report written to %s", out)
    return out
