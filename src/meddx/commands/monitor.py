"""``meddx monitor``: drift, CDS feedback and live performance from a service's audit log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["register", "monitor"]

console = Console()


def _line(m: dict[str, Any]) -> str:
    o = m["overall"]
    parts = [f"{o['answers']} answers", f"{o['errors']} errors"]
    risk = o.get("risk", {})
    if "psi" in risk:
        parts.append(f"risk PSI {risk['psi']:.3f} ({risk['status']})")
    inputs = [f"{k} {d['psi']:.3f} ({d['status']})" for k, d in o.get("inputs", {}).items()
              if "psi" in d]
    if inputs:
        parts.append("input PSI " + ", ".join(inputs))
    if o["cds"]["feedback"]:
        a = o["cds"]["acceptance"]
        parts.append(f"CDS acceptance {a['value']:.0%} of {o['cds']['feedback']}")
    perf = o.get("performance")
    if perf and perf.get("auroc", {}).get("value") is not None:
        au = perf["auroc"]
        parts.append(f"live AUROC {au['value']:.3f} ({au['low']:.3f}–{au['high']:.3f}, "
                     f"n={perf['n']})")
    return f"[bold]{escape(m['name'])}[/]: " + escape(", ".join(parts))


def monitor(
    audit_log: Path = typer.Argument(..., help="The service's audit log (JSON lines)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for monitor.html and "
                             "monitor.json."),
    package: list[Path] = typer.Option([], "--package", "-p", help="Package folder of a "
                                       "model in the log (its card holds the training "
                                       "reference). Repeatable."),
    model: str | None = typer.Option(None, "--model", "-m", help="Only this model."),
    outcomes: Path | None = typer.Option(None, "--outcomes", help="CSV request_id,outcome"
                                         "[,input]: live AUROC and calibration."),
    feedback: Path | None = typer.Option(None, "--feedback", help="CDS feedback log "
                                         "(default: cds-feedback.jsonl beside the audit log)."),
    window: str = typer.Option("1d", "--window", "-w", help="1d, 12h, 1w … (UTC calendar "
                               "windows) or N (every N answers)."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples for the 95% CIs."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
) -> None:
    """Monitor a deployed model: PSI drift of predicted risk and input statistics against
    the package's training reference, errors, OOD, CDS feedback acceptance and, with
    --outcomes, live AUROC and calibration with 95% CIs, per window.

    Flags follow the usual PSI reading: above 0.1 a moderate shift, above 0.25 a major one
    (unless an unshifted window of that size reaches it by chance).
    """
    from meddx.monitoring import monitor as run

    result = run(audit_log, package, out=out, model=model, outcomes=outcomes,
                 feedback=feedback, window=window, bootstrap=bootstrap, seed=seed)
    console.print(f"{result['lines']} lines: {result['answers']} answers, "
                  f"{result['errors']} errors, {result['skipped']['total']} malformed "
                  f"lines skipped" + (f" ({escape(str(result['skipped']['by_reason']))})"
                                      if result["skipped"]["total"] else ""))
    for m in result["models"]:
        console.print(_line(m))
        for note in m["notes"]:
            console.print(f"  [yellow]note:[/] {escape(note)}")
    if result["flags"]:
        console.print("[bold red]flags[/] (PSI > 0.1 moderate, > 0.25 major shift):")
        for f in result["flags"]:
            console.print(f"  [red]•[/] {escape(f)}")
    else:
        console.print("no flags (PSI ≤ 0.1 or within sampling noise; no live AUROC below the "
                      "card's)")
    console.print(f"report: {result['files']['html']}")


def register(app: typer.Typer) -> None:
    app.command("monitor")(monitor)
