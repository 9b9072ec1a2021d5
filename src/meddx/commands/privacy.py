"""``meddx deid``: DICOM de-identification (PS3.15 Table E.1-1 basic profile, allow-list)."""

from __future__ import annotations

import secrets
from pathlib import Path

import typer

__all__ = ["register"]


def deid(
    src: Path = typer.Argument(..., help="A DICOM file or a folder of DICOM files."),
    dst: Path = typer.Argument(..., help="Output file or folder (never the input)."),
    salt: str = typer.Option(None, "--salt", envvar="MEDDX_DEID_SALT",
                             help="Secret for pseudonyms and new UIDs (or MEDDX_DEID_SALT); the "
                             "same salt keeps a patient's studies linked across runs."),
    keep_patient_characteristics: bool = typer.Option(
        False, "--keep-patient-characteristics",
        help="Keep sex, age, size, weight (PS3.15 Retain Patient Characteristics Option)."),
    allow_burned_in: bool = typer.Option(False, "--allow-burned-in",
                                         help="Accept images flagged with burned-in text."),
) -> None:
    """Write de-identified copies following PS3.15 Table E.1-1 (basic profile): identifying
    attributes removed, emptied or replaced, UIDs and the patient ID salted pseudonyms, private
    tags dropped, free text outside an allow-list emptied.

    Every file ends written, refused (named, with the reason) or skipped (not DICOM); the run
    exits 1 when any file was refused.

    Example: ``MEDDX_DEID_SALT=… meddx deid incoming/ clean/``
    """
    from meddx.errors import DataError
    from meddx.privacy import deidentify_folder, deidentify_one

    if not src.exists():
        raise DataError("input not found", path=str(src), hint="give a DICOM file or folder")
    if not salt:
        salt = secrets.token_hex(16)
        typer.echo("no --salt given: pseudonyms of this run cannot be linked to any other run",
                   err=True)
    options = {"salt": salt, "keep_patient_characteristics": keep_patient_characteristics,
               "allow_burned_in": allow_burned_in}
    run = deidentify_folder if src.is_dir() else deidentify_one
    summary = run(src, dst, **options)
    for outcome in summary.outcomes:
        if outcome.status != "written":
            typer.echo(f"  {outcome.status}: {outcome.source}: {outcome.reason}", err=True)
        for warning in outcome.report.warnings if outcome.report else ():
            typer.echo(f"  check: {outcome.source}: {warning}", err=True)
    typer.echo(f"de-identified into {dst}: {summary.count('written')} written, "
               f"{summary.count('refused')} refused, {summary.count('skipped')} skipped")
    if not summary.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``meddx deid`` to the CLI."""
    app.command("deid")(deid)
