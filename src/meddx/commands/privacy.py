"""``meddx deid``: DICOM de-identification (allow-list, PS3.15 Annex E basis)."""

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
        False, "--keep-patient-characteristics", help="Keep sex, age, size and weight."),
    allow_burned_in: bool = typer.Option(False, "--allow-burned-in",
                                         help="Accept images flagged with burned-in text."),
) -> None:
    """Write de-identified copies: only pixel, geometry and technique attributes are kept,
    UIDs and the patient ID are replaced by salted pseudonyms, private tags are dropped.

    Example: ``MEDDX_DEID_SALT=… meddx deid incoming/ clean/``
    """
    from meddx.privacy import deidentify_file, deidentify_folder

    if not salt:
        salt = secrets.token_hex(16)
        typer.echo("no --salt given: pseudonyms of this run cannot be linked to any other run",
                   err=True)
    options = {"salt": salt, "keep_patient_characteristics": keep_patient_characteristics,
               "allow_burned_in": allow_burned_in}
    if src.is_dir():
        reports = deidentify_folder(src, dst, **options)
    else:
        reports = {dst.name: deidentify_file(src, dst, **options)}
    warned = sum(bool(r.warnings) for r in reports.values())
    typer.echo(f"de-identified {len(reports)} file(s) into {dst}"
               + (f"; {warned} need a look for burned-in text" if warned else ""))
    for name, report in reports.items():
        for warning in report.warnings:
            typer.echo(f"  {name}: {warning}", err=True)


def register(app: typer.Typer) -> None:
    """Add ``meddx deid`` to the CLI."""
    app.command("deid")(deid)
