"""Cluster commands: ``meddx predict … --ray`` (archive inference) and ``meddx cluster …``.

Ray is imported only when one of these runs (the ``cluster`` extra), so ``meddx --help``
stays fast and a machine without Ray gets a ConfigError naming ``pip install 'meddx[cluster]'``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from meddx.errors import ConfigError

__all__ = ["archive_predict", "register"]

logger = logging.getLogger(__name__)
err = Console(stderr=True)

RAY_HELP = ("Run on a Ray cluster: its head's host:port, 'auto' (RAY_ADDRESS or the cluster "
            "this machine belongs to) or 'local' (a Ray started on this machine). Needs --out "
            "(a Parquet dataset directory) and a single SOURCE: a folder or a CSV manifest.")


def _address(ray_address: str) -> str | None:
    return None if ray_address == "local" else ray_address


def archive_predict(model: Path, inputs: list[str], out: Path | None, ray_address: str, *,
                    backend: str, operating_point: str | None, block_size: int, workers: int,
                    threads: int, worker_cpus: float | None, read_cpus: float,
                    readers: int | None, suffixes: tuple[str, ...]) -> None:
    """``meddx predict MODEL SOURCE --ray ADDRESS --out results.parquet`` (see RAY_HELP)."""
    from meddx.cluster.archive import ArchiveConfig

    if out is None:
        raise ConfigError("--ray needs --out: the Parquet dataset directory of the results",
                          hint="e.g. --out results.parquet")
    if len(inputs) != 1:
        raise ConfigError(f"--ray takes one SOURCE (a folder or a CSV manifest); got "
                          f"{len(inputs)}", hint="list many files in a CSV manifest with a "
                          "'path' column")
    cfg = ArchiveConfig(model=model, out=out, backend=backend, operating_point=operating_point,
                        block_size=block_size, workers=workers, threads=threads,
                        worker_cpus=worker_cpus if worker_cpus is not None else float(threads),
                        read_cpus=read_cpus, readers=readers)
    _run_job(cfg, inputs[0], suffixes, ray_address, None, "predicting")


SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".svslide",
                  ".vms", ".vmu")


def wsi_cohort(
    model: Path = typer.Argument(..., help="A slide-level model package (pathology)."),
    slides: str = typer.Argument(..., metavar="SLIDES", help="A folder of slide files or a CSV "
                                 "manifest (path[,id]; a DICOM WSI folder goes in a manifest)."),
    ray_address: str = typer.Option(..., "--ray", metavar="ADDRESS",
                                    help="host:port of the Ray head, 'auto' or 'local'."),
    out: Path = typer.Option(..., "--out", help="Parquet dataset directory of the slide "
                             "predictions (resumable)."),
    cache: Path | None = typer.Option(None, "--cache", help="Bag cache root on storage every "
                                      "node shares (sets MEDDX_CACHE on the workers) [default: "
                                      "each node's own MEDDX_CACHE]."),
    workers: int = typer.Option(1, "--workers", help="Predicting actors."),
    threads: int = typer.Option(1, "--threads", help="Torch threads per actor."),
    worker_cpus: float | None = typer.Option(None, "--worker-cpus",
                                             help="CPUs reserved per actor (default: --threads)."),
    read_cpus: float = typer.Option(1.0, "--read-cpus",
                                    help="CPUs reserved per slide-embedding task."),
) -> None:
    """Embed a cohort of slides on Ray (one task per slide, writing the same bag cache as
    ``meddx predict`` / training on one machine) and predict every slide with MODEL.

    Example: ``meddx cluster wsi runs/camelyon/model slides.csv --ray head:6379 --cache
    /shared/meddx-cache --out cohort.parquet``. A rerun skips slides already predicted and
    reuses every bag already cached.
    """
    from meddx.cluster.archive import ArchiveConfig

    cfg = ArchiveConfig(model=model, out=out, block_size=1, workers=workers, threads=threads,
                        worker_cpus=worker_cpus if worker_cpus is not None else float(threads),
                        read_cpus=read_cpus)
    env = {"MEDDX_CACHE": str(cache.resolve())} if cache else None
    _run_job(cfg, slides, SLIDE_SUFFIXES, ray_address, env, "slides")


def _run_job(cfg: Any, source: str, suffixes: tuple[str, ...], ray_address: str,
             env: dict[str, str] | None, what: str) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from meddx.cluster import connect, require_ray
    from meddx.cluster.archive import run_archive
    from meddx.cluster.sources import list_inputs

    refs = list_inputs(source, suffixes)
    joined_here = not require_ray().is_initialized()
    ray = connect(_address(ray_address), runtime_env={"env_vars": env} if env else None)
    try:
        with Progress("[progress.description]{task.description}", BarColumn(),
                      MofNCompleteColumn(), TimeRemainingColumn(), console=err) as bar:
            task = bar.add_task(what, total=len(refs))
            result = run_archive(cfg, refs, ray,
                                 progress=lambda done, total: bar.update(task, completed=done))
    finally:
        if joined_here:
            ray.shutdown()
    err.print(f"{result.written} rows written to {cfg.out} ({result.skipped} already there, "
              f"{result.errors} with an error; {result.attempts} attempt(s))")
    if result.errors:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the ``cluster`` command group to ``app``."""
    group = typer.Typer(help="Batch work on a Ray cluster (the 'cluster' extra).",
                        no_args_is_help=True)
    group.command("wsi")(wsi_cohort)
    app.add_typer(group, name="cluster")
