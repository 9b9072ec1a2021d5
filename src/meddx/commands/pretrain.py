"""``meddx pretrain``: self-supervised (SimCLR) pretraining → an ``--init-weights`` file."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from meddx.errors import ConfigError

__all__ = ["register"]

console = Console(width=None if sys.stdout.isatty() else 160)


def pretrain(
    config: Path | None = typer.Argument(None, help="Experiment YAML (see configs/): its data "
                                         "and network are pretrained."),
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="Catalog dataset name "
                                       "(its shipped recipe gives the network)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="The .safetensors file to write "
                                    "(default runs/pretrain/<name>.safetensors)."),
    epochs: int = typer.Option(100, help="Passes over the images."),
    batch_size: int = typer.Option(128, help="Images per step (two views each; at least 2)."),
    lr: float = typer.Option(1e-3, help="Peak AdamW learning rate (cosine, linear warm-up)."),
    temperature: float = typer.Option(0.2, help="NT-Xent temperature."),
    splits: list[str] = typer.Option(None, "--splits", help="Splits whose images are used: "
                                     "train (default), or e.g. train,calib; adding test is "
                                     "transductive. Repeatable or comma-separated."),
    size: int | None = typer.Option(None, help="Image size (MedMNIST: 28/64/128/224); must "
                                    "match the fine-tuning run."),
    limit: int | None = typer.Option(None, help="At most this many samples per split."),
    max_minutes: float | None = typer.Option(None, help="Stop after this many minutes (the "
                                             "weights are still written)."),
    threads: int | None = typer.Option(None, help="CPU threads."),
    seed: int | None = typer.Option(None, help="Random seed."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Pretrain a network on unlabelled images (SimCLR) and write its backbone weights.

    Two random views of every image (crop, flips, rotation, colour jitter) are pulled
    together, the other images of the batch pushed away (NT-Xent loss); labels are never
    read. The file holds the network's weights without its classification layer, under the
    names training uses, for `meddx train --init-weights FILE` (same config and --size).

    Examples:\n
      meddx pretrain configs/breastmnist.yaml --epochs 100 --out runs/pretrain/breastmnist.safetensors\n
      meddx train configs/breastmnist.yaml --init-weights runs/pretrain/breastmnist.safetensors\n
      meddx pretrain configs/isic2017.yaml --size 64 --splits train,calib --out runs/pretrain/isic2017.safetensors\n
      meddx train configs/isic2017.yaml --size 64 --init-weights runs/pretrain/isic2017.safetensors
    """
    from meddx.config import ExperimentConfig, load_config
    from meddx.training.pretrain import pretrain as run_pretraining

    if config is None and dataset is None:
        raise ConfigError("give a config file or --dataset", hint="see `meddx datasets`")
    if out is not None and out.suffix != ".safetensors":
        raise ConfigError(f"--out must end in .safetensors, got '{out.name}'")
    recipe = None
    if config is None and dataset:
        from meddx.catalog import get_entry, recipe_for

        get_entry(dataset)  # an unknown name fails here, with a did-you-mean
        recipe = recipe_for(dataset)
    if config is not None or recipe is not None:
        cfg = load_config(config or recipe)
    else:
        cfg = ExperimentConfig(name=dataset or "experiment")
    cfg = cfg.updated(**{"data.dataset": dataset, "data.size": size, "data.limit": limit})
    if dataset and config is None:
        cfg = cfg.updated(name=dataset)
    chosen = tuple(s.strip() for item in (splits or ["train"]) for s in item.split(",")
                   if s.strip())
    target = out or Path("runs") / "pretrain" / f"{cfg.name}.safetensors"
    report = run_pretraining(cfg, out=target, splits=chosen, epochs=epochs,
                             batch_size=batch_size, lr=lr, temperature=temperature,
                             max_minutes=max_minutes, threads=threads, seed=seed,
                             progress=not no_progress)
    m = report.metadata
    console.print(f"[bold green]pretrained[/] {m['network']} on {m['n_images']} images "
                  f"({', '.join(m['splits'])}) for {m['epochs_run']} epochs: NT-Xent "
                  f"{m['first_loss']:.3f} → {m['final_loss']:.3f}, {m['seconds']} s")
    console.print(f"weights: {report.path} (+ {report.sidecar.name})")
    hint = f"{config} " if config else f"--dataset {dataset} "
    size_flag = f"--size {size} " if size else ""
    console.print(f"next: meddx train {hint}{size_flag}--init-weights {report.path}")


def register(app: typer.Typer) -> None:
    """Add ``pretrain`` to ``app``."""
    app.command("pretrain")(pretrain)
