"""``meddx audit verify``: check the hash chain of a service's audit log."""

from __future__ import annotations

from pathlib import Path

import typer

__all__ = ["register"]

audit_app = typer.Typer(help="The service's audit log (JSON lines, hash-chained).",
                        no_args_is_help=True)


@audit_app.command("verify")
def verify(
    log: Path = typer.Argument(..., help="Audit log (JSON lines) written by `meddx serve`."),
    expect: str | None = typer.Option(None, "--expect", help="A line hash printed by an "
                                      "earlier check: the log must still hold it (shows that "
                                      "no lines were cut from the end since)."),
) -> None:
    """Find an edited, deleted or reordered line: prints OK and the line count, or names the
    first bad line and why (exit code 1)."""
    from meddx.serving.audit_chain import verify_log

    v = verify_log(log, expect=expect)
    if v.ok:
        head = f", the first {v.unchained} written before the chain (not verifiable)" \
            if v.unchained else ""
        typer.echo(f"OK {v.lines} lines{head}; last hash {v.last_hash}")
        return
    where = f"line {v.bad_line}" if v.bad_line else "end of the log"
    typer.echo(f"FAILED at {where} of {log}: {v.reason}", err=True)
    raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``audit``."""
    app.add_typer(audit_app, name="audit")
