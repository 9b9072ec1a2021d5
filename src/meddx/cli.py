"""The ``meddx`` command line (Typer + Rich).

Commands live in ``meddx/commands/<area>.py`` modules, each with ``register(app)``, and in the
modality folders that add their own (``COMMANDS`` in ``meddx/modalities/<name>/__init__.py``,
e.g. ``meddx fhir`` from the EHR folder); this file only configures logging, wires them and turns :class:`~meddx.errors.MeddxError` into a clear
message and exit code 2 instead of a stack trace.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import typer
from rich.console import Console
from rich.logging import RichHandler

from meddx.errors import MeddxError

__all__ = ["app", "main"]

app = typer.Typer(
    name="meddx",
    help="Deep learning in medicine, from dataset to bedside: train, evaluate, explain and "
    "serve clinical models on a CPU.\n\nStart with `meddx datasets`, then "
    "`meddx train --dataset breastmnist --out runs/breast`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)

# one line per command module; a module whose optional dependencies are missing is skipped
COMMAND_MODULES = ("core", "pretrain", "evaluate", "serve", "privacy", "monitor", "trust",
                   "cluster")


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logging."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=err_console, show_path=False)], force=True)
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not verbose else logging.INFO)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")


def _register() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"meddx.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("meddx.commands"):
                continue
            raise
        module.register(app)
    from meddx.modalities import modality_packages
    from meddx.registry import load_target

    for package in modality_packages():
        if getattr(package, "COMMANDS", None):
            load_target(package.COMMANDS)(app)


_register()


def main() -> None:
    """Entry point: run the app and map meddx errors to exit code 2 with a readable message."""
    import warnings

    warnings.filterwarnings("ignore")
    try:
        rc = app(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except MeddxError as e:
        from rich.markup import escape

        err_console.print(f"[bold red]error:[/] {escape(str(e))}")  # "[died]" is text
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        sys.exit(code or 0)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
