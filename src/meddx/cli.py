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


# Typer (0.2x) vendors its own copy of Click and raises that copy's classes; Click proper
# raises its own. The handler below takes both, whichever is installed, so that a new release
# moving the classes again cannot turn a user's typo back into a traceback.
_CLICK_MODULES = ("typer._click.exceptions", "click.exceptions", "typer.exceptions")


def _classes(name: str) -> tuple[type[BaseException], ...]:
    """The exception class ``name`` from every Click flavour that is installed."""
    found: list[type[BaseException]] = []
    for module_name in _CLICK_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        cls = getattr(module, name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException) and cls not in found:
            found.append(cls)
    return tuple(found)


def _usage_error(e: BaseException) -> int:
    """Print a Click usage error as Click does (usage line, ``Try 'meddx X --help'``, the
    error) and return its exit code (2 for usage errors)."""
    show = getattr(e, "show", None)
    if callable(show):
        show()
    else:  # pragma: no cover - every Click flavour has show()
        err_console.print(f"error: {e}")
    return int(getattr(e, "exit_code", 2) or 2)


def main() -> None:
    """Entry point: run the app; map meddx errors and command-line usage errors to exit code 2
    with a readable message (usage line and a hint), never a traceback."""
    import warnings

    warnings.filterwarnings("ignore")
    exits, aborts, usage = _classes("Exit"), _classes("Abort"), _classes("ClickException")
    try:
        rc = app(standalone_mode=False, prog_name="meddx")
        sys.exit(rc if isinstance(rc, int) else 0)
    except MeddxError as e:
        from rich.markup import escape

        err_console.print(f"[bold red]error:[/] {escape(str(e))}")  # "[died]" is text
        sys.exit(2)
    except SystemExit:
        raise
    except Exception as e:
        if exits and isinstance(e, exits):
            sys.exit(getattr(e, "exit_code", 0) or 0)
        if aborts and isinstance(e, aborts):
            err_console.print("aborted")
            sys.exit(130)
        if usage and isinstance(e, usage):
            sys.exit(_usage_error(e))
        raise
    except KeyboardInterrupt:
        err_console.print("aborted")
        sys.exit(130)


if __name__ == "__main__":
    main()
