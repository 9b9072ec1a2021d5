"""Core commands: datasets, models, train, ensemble, predict."""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from meddx.errors import ConfigError, MeddxError

__all__ = ["register"]

logger = logging.getLogger(__name__)
# piped output is not squeezed to 80 columns
console = Console(width=None if sys.stdout.isatty() else 160)

INPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", ".nii",
                  ".nii.gz", ".npy", ".hea", ".mat", ".csv", ".json", ".txt", ".fa", ".fasta")


def datasets(
    download: str | None = typer.Option(None, "--download", help="Download this dataset into "
                                        "~/.cache/meddx (needs internet; MD5-checked)."),
    size: int | None = typer.Option(None, "--size", help="Image size to download (28/64/128/224)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List known datasets: modality, task, license, and whether they are available offline."""
    from meddx.catalog import catalog, is_available, recipe_for
    from meddx.catalog import download as fetch

    if download:
        path = fetch(download, size)
        console.print(f"downloaded to {path}")
        return
    rows = []
    for name, e in sorted(catalog().items()):
        rows.append({"name": name, "modality": e.modality, "task": e.task.describe(),
                     "offline": is_available(e), "license": e.license, "sizes": e.sizes,
                     "recipe": recipe_for(name) is not None})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="meddx datasets", show_lines=False)
    for col in ("name", "modality", "task", "offline", "recipe", "license"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], r["modality"], r["task"][:60],
                      "[green]yes[/]" if r["offline"] else "[dim]no[/]",
                      "yes" if r["recipe"] else "", r["license"])
    console.print(table)
    console.print("[dim]offline = found under MEDDX_DATA or ../shared/data; "
                  "others: `meddx datasets --download NAME` where an address is known. "
                  "recipe = `meddx train --dataset NAME` starts from the benchmarked settings[/]")


def models() -> None:
    """List the registered networks and the modality each serves."""
    from meddx.models import MODELS

    table = Table(title="meddx models")
    table.add_column("name")
    table.add_column("modality")
    table.add_column("description", overflow="fold")
    for name in MODELS.names():
        try:
            fn = MODELS.get(name)
        except ConfigError as e:
            table.add_row(name, "?", f"[dim]unavailable: {e.message}[/]")
            continue
        doc = (fn.__doc__ or "").strip().splitlines()
        table.add_row(name, getattr(fn, "modality", "?"), doc[0] if doc else "")
    console.print(table)


def train(
    config: Path | None = typer.Argument(None, help="Experiment YAML (see configs/)."),
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="Catalog dataset name."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run folder (default runs/<name>)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Network (see `meddx models`)."),
    epochs: int | None = typer.Option(None, help="Maximum epochs."),
    batch_size: int | None = typer.Option(None, help="Batch size."),
    lr: float | None = typer.Option(None, help="Learning rate."),
    size: int | None = typer.Option(None, help="Image size (MedMNIST: 28/64/128/224)."),
    split: str | None = typer.Option(None, help="Split scheme where the data has none "
                                     "(random, scaffold)."),
    seed: int | None = typer.Option(None, help="Random seed."),
    limit: int | None = typer.Option(None, help="At most this many samples per split."),
    threads: int | None = typer.Option(None, help="CPU threads."),
    devices: int | None = typer.Option(None, help="Processes/GPUs (with --strategy ddp)."),
    strategy: str | None = typer.Option(None, help="Lightning strategy, e.g. ddp."),
    init_weights: Path | None = typer.Option(None, help="Start from these .safetensors weights."),
    option: list[str] = typer.Option(None, "--option", help="A data option KEY=VALUE for the "
                                     "modality (data.options; the value is read as YAML: 100, "
                                     "true, [I, II]); repeatable."),
    no_recipe: bool = typer.Option(False, "--no-recipe", help="With --dataset and no config: "
                                   "start from plain defaults, not the dataset's shipped recipe."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
    ray: str | None = typer.Option(None, "--ray", metavar="ADDRESS", help="Train on a Ray "
                                   "cluster (meddx[cluster]): its head's host:port, 'auto' "
                                   "(the cluster this machine is in) or 'local' (start one "
                                   "here)."),
    workers: int | None = typer.Option(None, "--workers", min=1, help="With --ray: DDP worker "
                                       "processes (default 2); train.batch_size is split "
                                       "over them."),
    storage: str | None = typer.Option(None, "--storage", help="With --ray: checkpoint "
                                       "storage every node reaches (folder or URI; default "
                                       "OUT/ray)."),
    max_failures: int = typer.Option(2, "--max-failures", min=0, help="With --ray: worker "
                                     "restarts from the last checkpoint before giving up."),
) -> None:
    """Train a model and write a verified package to OUT/model.

    With --dataset and no config file, the dataset's shipped recipe (the benchmarked settings
    in configs/, e.g. configs/physionet2017.yaml) is the starting point when there is one; the
    other flags override it.

    Examples:\n
      meddx train --dataset breastmnist --out runs/breast\n
      meddx train configs/retinamnist.yaml --epochs 50\n
      meddx train --dataset physionet2017 --option fs=100 --out runs/af\n
      meddx train configs/breastmnist.yaml --ray 10.0.0.5:6379 --workers 4 --storage /shared/ckpt
    """
    from meddx.config import ExperimentConfig, load_config
    from meddx.training import train as run_training

    if config is None and dataset is None:
        raise ConfigError("give a config file or --dataset", hint="see `meddx datasets`")
    recipe = None
    if config is None and dataset and not no_recipe:
        from meddx.catalog import get_entry, recipe_for

        get_entry(dataset)  # an unknown name fails here, with a did-you-mean
        recipe = recipe_for(dataset)
    if config is not None or recipe is not None:
        cfg = load_config(config or recipe)
        if recipe is not None:
            console.print(f"recipe: {recipe.name} (the benchmarked settings for {dataset}; "
                          "--no-recipe starts from plain defaults)")
        if model and model != cfg.model.name:  # the recipe's options are for its own network
            cfg = cfg.updated(**{"model.options": {}})
    else:
        cfg = ExperimentConfig(name=dataset or "experiment")
    cfg = cfg.updated(**{
        "data.dataset": dataset, "model.name": model, "train.epochs": epochs,
        "train.batch_size": batch_size, "train.lr": lr, "data.size": size, "data.split": split,
        "seed": seed, "data.limit": limit, "train.threads": threads, "train.devices": devices,
        "train.strategy": strategy, "model.init_weights": str(init_weights) if init_weights else None,
    })
    if dataset and config is None:
        cfg = cfg.updated(name=dataset)
    cfg = _with_data_options(cfg, option or [])
    if ray is None and (workers is not None or storage is not None):
        raise ConfigError("--workers and --storage are for training on a Ray cluster",
                          hint="add --ray ADDRESS (or 'local'), or use --devices for DDP "
                               "on this machine")
    if ray is not None:
        from meddx.cluster.train import train_on_ray

        package = train_on_ray(cfg, out=out, address=None if ray == "local" else ray,
                               workers=workers or 2, storage=storage,
                               max_failures=max_failures, resume=resume)
    else:
        package = run_training(cfg, out=out, resume=resume, progress=not no_progress)
    if package is None:  # non-zero DDP rank
        return
    t = package.card.training
    metric, score = t.get("selection_metric"), t.get("best_score", float("nan"))
    if t.get("members"):
        each = [m.get("best_score") for m in t["members"] if m.get("best_score") is not None]
        spread = f" (members {min(each):.4f}-{max(each):.4f})" if each else ""
        console.print(f"[bold green]trained[/] {package.card.name}: ensemble of "
                      f"{len(t['members'])}, {metric} = {score:.4f} on val{spread}, "
                      f"{t.get('wall_time_s')} s of training")
    else:
        console.print(f"[bold green]trained[/] {package.card.name}: best {metric} = "
                      f"{score:.4f} at epoch {t.get('best_epoch')}, {t.get('wall_time_s')} s")
    if package.card.calibration:
        console.print(f"calibrated on calib: temperature {package.card.calibration.temperature:.3f}")
    console.print(f"package: {package.path}")


def ensemble(
    packages: list[Path] = typer.Argument(..., help="Package folders (runs/<name>/model)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the joined package."),
    tta: str | None = typer.Option(None, help="Test-time augmentation: none, hflip (2 views) "
                                   "or flips (every flip: 4 views in 2D, 8 in 3D); default: "
                                   "the first package's."),
    name: str | None = typer.Option(None, help="Name on the card."),
    no_post_hoc: bool = typer.Option(False, "--no-post-hoc",
                                     help="Join without refitting temperature, operating "
                                          "points and conformal sets (for measuring only)."),
) -> None:
    """Join trained packages into one: a seed ensemble (mean of logits), test-time flips, or
    both — one package, one ONNX graph.

    The calibration fits are refit on the calibration split, so the members must share it
    (packages record their splits' fingerprints); `model.options.members` in a config trains
    such an ensemble in one go.

    Examples:

      meddx ensemble runs/isic/model --tta flips --out runs/isic-tta

      meddx ensemble runs/a/model runs/b/model runs/c/model --tta flips --out runs/abc

      meddx export runs/abc --onnx
    """
    from meddx.models.combine import describe, tta_views
    from meddx.training.combine import join_packages

    package = join_packages(packages, out, tta=tta, post_hoc=not no_post_hoc, name=name)
    options = package.card.network.get("options", {})
    views = tta_views(options.get("tta"), int(package.card.preprocessing.get("spatial_dims", 2)))
    members = int(options.get("members", 1) or 1)
    console.print(f"[bold green]joined[/] {package.card.name}: {describe(options)} "
                  f"({members * views} forward passes per input)")
    if package.card.calibration:
        console.print(f"calibrated on calib: temperature {package.card.calibration.temperature:.3f}")
    console.print(f"package: {package.path}")


def _key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--option``: a plain option name (no dotted config path)."""
    from meddx.config import parse_key_value

    key, value = parse_key_value(text, "--option")
    if not key.isidentifier():
        raise ConfigError(f"--option '{text}': '{key}' is not an option name",
                          hint="give the key inside data.options, e.g. --option fs=100")
    return key, value


def _with_data_options(cfg: Any, pairs: list[str]) -> Any:
    """``cfg`` with ``--option`` pairs set in ``data.options`` (later ones win), checked now
    against the modality's options rather than after minutes of data loading."""
    if not pairs:
        return cfg
    from meddx.catalog import get_entry
    from meddx.modalities import get_modality
    from meddx.registry import suggest

    given = dict(_key_value(p) for p in pairs)
    cfg = cfg.updated(**{"data.options": {**cfg.data.options, **given}})
    entry = get_entry(cfg.data.dataset) if cfg.data.dataset else None
    name = cfg.data.modality or (entry.modality if entry else None)
    if name is None:
        return cfg  # training says what is missing
    modality = get_modality(name)
    known = list(modality.Options.model_fields)
    for key in given:
        if key not in known:
            close = suggest(key, known)  # a guess, or else the full list
            listed = close.startswith("; choose")
            raise ConfigError(f"unknown --option '{key}' for {name} data" + close,
                              hint=None if listed else f"{name} data options: "
                              + ", ".join(sorted(known)))
    modality.parse_options({**(entry.options if entry else {}), **cfg.data.options})
    return cfg


def _expand(inputs: list[str]) -> list[Path]:
    out: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file()
                           and f.name.lower().endswith(INPUT_SUFFIXES) and f.suffix != ".mat")
            out.extend(files)
        else:
            out.append(p)
    return out


def predict(
    model: Path = typer.Argument(..., help="Model package folder."),
    inputs: list[str] = typer.Argument(None, help="Files or folders (images, DICOM, NIfTI, "
                                       ".npy, WFDB .hea, FHIR JSON …)."),
    smiles: list[str] = typer.Option(None, "--smiles", help="A SMILES string (repeatable)."),
    sequence: list[str] = typer.Option(None, "--sequence", help="A DNA sequence (repeatable)."),
    variant: str | None = typer.Option(None, "--variant", help="Variant effect: FILE.fa:POS:REF>ALT."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, csv or json."),
    sort: str | None = typer.Option(None, "--sort", help="'risk': rank by the positive class "
                                    "probability (worklist triage)."),
    fs: float | None = typer.Option(None, "--fs", help="Sampling rate (Hz) of CSV waveforms "
                                    "that do not state it."),
    backend: str = typer.Option("auto", help="auto, torch, onnx or onnx-int8."),
    batch_size: int = typer.Option(64, help="Inputs per batch."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the output to this file."),
    operating_point: str | None = typer.Option(
        None, "--operating-point", help="Decide at this operating point of the card "
        "(e.g. balanced, sensitivity@0.8, youden); default: the card's default."),
    ray: str | None = typer.Option(None, "--ray", metavar="ADDRESS", help="Run as an archive "
                                   "job on a Ray cluster: host:port, 'auto' or 'local'; "
                                   "writes a Parquet dataset to --out, resumable."),
    workers: int = typer.Option(1, "--workers", help="With --ray: predicting actors."),
    threads: int = typer.Option(1, "--threads", help="With --ray: torch threads per actor."),
    worker_cpus: float | None = typer.Option(None, "--worker-cpus", help="With --ray: CPUs "
                                             "reserved per actor (default: --threads)."),
    read_cpus: float = typer.Option(1.0, "--read-cpus", help="With --ray: CPUs reserved per "
                                    "reader."),
    readers: int | None = typer.Option(None, "--readers", min=1, help="With --ray: actors "
                                       "that read and preprocess (default: --workers)."),
    side_inputs: Path | None = typer.Option(
        None, "--side-inputs", help="CSV of side inputs (age, sex, site …) for a model that "
        "takes them: an id column (the image's file name or stem) and one column per input; "
        "empty or 'unknown' = missing (flagged in each prediction's notes)."),
) -> None:
    """Predict with a package: the decision at the operating point (the recommendation, first
    column), the most likely class, (calibrated) probabilities, the conformal set, the OOD flag.

    Inputs that cannot be assessed are listed with their reason (stderr; in CSV and JSON
    output too). Lines a reader left out are counted by reason: a warning line here, and
    ``notes.dropped_lines`` in each prediction.

    Examples:\n
      meddx predict runs/breast/model scan1.png scan2.dcm\n
      meddx predict runs/breast/model studies/ --sort risk --format csv\n
      meddx predict runs/icu/model stays/ --operating-point sensitivity@0.8 --format csv\n
      meddx predict runs/breast/model archive.csv --ray head:6379 --out results.parquet\n
      meddx predict runs/derm/model lesions/ --side-inputs patients.csv --format json
    """
    from meddx.commands.inputs import inline_inputs
    from meddx.inference import load_model

    if ray is not None:
        from meddx.commands.cluster import archive_predict

        return archive_predict(model, inputs or [], out, ray, backend=backend,
                               operating_point=operating_point, block_size=batch_size,
                               workers=workers, threads=threads, worker_cpus=worker_cpus,
                               read_cpus=read_cpus, readers=readers or workers,
                               suffixes=INPUT_SUFFIXES)
    if fmt not in ("table", "csv", "json"):
        raise ConfigError(f"unknown format '{fmt}'; use table, csv or json")
    predictor = load_model(model, backend=backend, operating_point=operating_point)
    if variant:
        effect = predictor.modality.variant_effect(predictor, variant)
        typer.echo(json.dumps(effect, indent=2))
        return
    sources: list[Any] = inline_inputs(predictor.card, smiles, sequence)
    paths = _expand(inputs or [])
    if not sources and not paths:
        raise ConfigError("nothing to predict: give files, a folder, --smiles or --sequence")
    if fs is not None:
        sources += [{"path": str(p), "fs": fs} for p in paths if p.suffix.lower() == ".csv"]
        paths = [p for p in paths if p.suffix.lower() != ".csv"]
    table = _side_table(predictor, side_inputs)
    preds, failures = _run(predictor, sources, paths, batch_size, table)
    _warn_dropped(preds, failures)
    if sort == "risk":
        preds.sort(key=lambda p: -(p.risk if p.risk is not None else max(p.probabilities.values())))
    elif sort is not None:
        raise ConfigError(f"unknown sort '{sort}'; use 'risk'")
    text = _render(preds, failures, fmt)
    if out:
        out.write_text(text)
        console.print(f"wrote {len(preds)} predictions to {out}")
    elif fmt == "table":
        _print_table(preds, failures)
    else:
        typer.echo(text)
    if failures:
        raise typer.Exit(1)


def _side_table(predictor: Any, path: Path | None) -> dict[str, Any] | None:
    """The ``--side-inputs`` table, refused for a model without side inputs."""
    if path is None:
        return None
    if predictor.card.side_inputs is None or not predictor.card.side_inputs.inputs:
        raise ConfigError(f"model '{predictor.card.name}' takes no side inputs",
                          hint="leave out --side-inputs; its card lists what it expects")
    from meddx.sideinputs import read_side_table

    return read_side_table(path)


def _run(predictor: Any, sources: list[Any], paths: list[Path], batch_size: int,
         table: dict[str, Any] | None = None) -> tuple[list[Any], list[dict[str, str]]]:
    from rich.progress import track

    from meddx.inference import attach_side_inputs
    from meddx.sideinputs import match_row, parse_records

    samples, failures = [], []
    items = [(s, _name(s)) for s in sources]
    items += [(p, p.name) for p in paths]
    for src, name in track(items, description="reading", console=Console(stderr=True),
                           disable=len(items) < 20):
        try:
            sample = predictor.read(str(src) if isinstance(src, Path) else src)
            sample.id = sample.id or name
            if table is not None:  # a bad value refuses this input only, with its reason
                row = match_row(table, name)
                parse_records(predictor.card.side_inputs.inputs, [row])
                attach_side_inputs(sample, row, "csv")
            samples.append(sample)
        except MeddxError as e:
            failures.append({"id": name, "error": str(e)})
    preds = []
    for start in range(0, len(samples), batch_size):
        preds += predictor.predict_samples(samples[start : start + batch_size])
    if table is not None:
        _warn_missing_side(preds)
    return preds, failures


def _warn_missing_side(preds: list[Any]) -> None:
    """One warning line counting the predictions made with side inputs missing."""
    hit = [p for p in preds if (p.notes.get("side_inputs") or {}).get("missing")]
    if hit:
        Console(stderr=True).print(
            f"[yellow]warning: {len(hit)} of {len(preds)} inputs predicted with side inputs "
            "missing (flagged, not imputed): see notes.side_inputs.missing[/]", soft_wrap=True)


def _warn_dropped(preds: list[Any], failures: list[dict[str, str]]) -> None:
    """One warning line with the lines the reader left out, by reason, over all inputs."""
    from collections import Counter

    counts: Counter[str] = Counter()
    hit = 0
    for p in preds:
        d = (p.notes or {}).get("dropped_lines") or {}
        if d.get("total"):
            hit += 1
            counts.update(d.get("by_reason", {}))
    if not counts:
        return
    why = ", ".join(f"{k.replace('_', ' ')} {n}" for k, n in counts.most_common())
    text = (f"warning: {sum(counts.values())} input lines left out in {hit} of {len(preds)} "
            f"predicted inputs ({why}); each prediction's notes.dropped_lines has its own "
            "counts" + (f"; {len(failures)} input(s) refused, with their reason" if failures
                        else ""))
    Console(stderr=True).print(f"[yellow]{escape(text)}[/]", soft_wrap=True)  # one line


def _name(source: Any) -> str:
    if isinstance(source, dict):
        return Path(source.get("path", "input")).name
    text = str(source)
    return text if len(text) < 40 else text[:37] + "…"


# The columns of the table and the CSV, named by what they are; the recommendation first.
COLUMNS = {
    "decision": "the recommendation: the decision at the operating point (empty: no decision, "
                "e.g. an input unlike the training data)",
    "operating_point": "the card's rule that decision uses (e.g. sensitivity@0.95: the "
                       "threshold that kept 95% sensitivity on the calibration split)",
    "threshold": "the decision is the positive class when its (calibrated) probability is at "
                 "least this",
    "most_likely_class": "the class with the highest probability, with no threshold (it can "
                         "differ from the decision: the operating point trades errors)",
    "conformal_set": "the classes the conformal predictor cannot rule out at its coverage",
    "refer": "the conformal set is not a single class: a human should look",
    "review": "the decision and the conformal set disagree: flagged, never resolved silently",
    "ood": "the input is unlike the training data (no decision is made); empty: the package "
           "has no detector",
}


def _text(value: Any) -> Any:
    if isinstance(value, list):
        return "|".join(map(str, value))
    if isinstance(value, dict):  # multilabel decision: the labels decided present
        return "|".join(k for k, v in value.items() if v)
    return value


def _row(p: Any) -> dict[str, Any]:
    d = p.to_dict()
    probs = d["calibrated"] or d["probabilities"]
    row = {"id": d["id"], "decision": _text(d["decision"]),
           "operating_point": d["operating_point"],
           "threshold": None if d["threshold"] is None else round(d["threshold"], 4),
           "most_likely_class": _text(d["label"])}
    row.update({f"p[{k}]": round(v, 4) for k, v in probs.items()})
    row["conformal_set"] = _text(d["prediction_set"]) if d["prediction_set"] else None
    row["refer"] = d["refer"]
    row["review"] = d["review"]
    row["ood"] = d["ood"]
    if d["ood_score"] is not None:
        row["ood_score"] = round(d["ood_score"], 4)
    dropped = (d.get("notes") or {}).get("dropped_lines")
    if isinstance(dropped, dict):
        row["dropped_lines"] = dropped.get("total", 0)
    side = (d.get("notes") or {}).get("side_inputs")
    if isinstance(side, dict):  # which side inputs were missing (flagged, not imputed)
        row["side_inputs_missing"] = " | ".join(side.get("missing") or []) or "none"
    return row


def _render(preds: list[Any], failures: list[dict[str, str]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps({"predictions": [p.to_dict() for p in preds], "errors": failures},
                          indent=2)
    rows: list[dict[str, Any]] = [_row(p) for p in preds]
    # inputs that could not be assessed are rows too, with their reason
    rows += [{"id": f["id"], "error": f["error"]} for f in failures]
    buf = io.StringIO()
    if rows:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(buf, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def _print_table(preds: list[Any], failures: list[dict[str, str]]) -> None:
    if preds:
        rows = [_row(p) for p in preds]
        calibrated = preds[0].calibrated is not None
        table = Table(title=f"{preds[0].model.get('name')} — "
                      + ("calibrated probabilities" if calibrated else "probabilities"))
        # escaped: "p[died]" and ids or labels with brackets are text, not rich markup
        cols = list(dict.fromkeys(k for r in rows for k in r))
        for col in cols:
            table.add_column(escape(col.replace("_", " ")), overflow="fold", no_wrap=col == "id")
        for r in rows:
            table.add_row(*["" if r.get(c) is None else escape(str(r[c])) for c in cols])
        console.print(table)
        console.print("\n".join(f"[bold]{k.replace('_', ' ')}[/]: {escape(v)}"
                                 for k, v in COLUMNS.items()), style="dim")
    for f in failures:
        Console(stderr=True).print(f"[red]failed[/] {escape(f['id'])}: {escape(f['error'])}")


def register(app: typer.Typer) -> None:
    """Add the core commands to ``app``."""
    app.command("datasets")(datasets)
    app.command("models")(models)
    app.command("train")(train)
    app.command("ensemble")(ensemble)
    app.command("predict")(predict)


