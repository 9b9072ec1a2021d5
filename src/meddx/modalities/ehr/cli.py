"""``meddx fhir``: FHIR R4B conversions (export PhysioNet 2012 stays as Bundles)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

__all__ = ["register"]

fhir_app = typer.Typer(help="FHIR R4B conversions.", no_args_is_help=True)


@fhir_app.command("export-physionet2012")
def export_physionet2012(
    file: Path = typer.Argument(..., help="A PhysioNet 2012 stay file (set-a/NNNNNN.txt)."),
    strict: bool = typer.Option(False, "--strict",
                                help="Fail on the first malformed line instead of leaving it "
                                "out with a warning."),
    indent: int = typer.Option(2, help="JSON indentation (0: compact)."),
) -> None:
    """Write a stay as a FHIR R4B Bundle (Patient, ICU Encounter, LOINC Observations) to stdout.

    Example: ``meddx fhir export-physionet2012 set-a/132539.txt > bundle.json``, then
    ``meddx predict runs/icu/model bundle.json``.
    """
    from meddx.modalities.ehr.fhir import physionet_to_bundle

    bundle = physionet_to_bundle(file, on_malformed="error" if strict else "warn")
    typer.echo(json.dumps(bundle, indent=indent or None, ensure_ascii=False))


def register(app: typer.Typer) -> None:
    """Add ``meddx fhir …`` to the CLI."""
    app.add_typer(fhir_app, name="fhir")
