"""Image datasets given as a folder of files plus a labels CSV, and ISIC 2017.

The CSV has one row per image: ``path,label[,patient_id][,split][,any metadata columns]``.
Paths are relative to the dataset root (absolute paths are kept). Labels are matched exactly
against the task's classes (never coerced: an unknown label is a :class:`DataError` naming the
image). Metadata columns (sex, age, site …) are kept per split for subgroup analysis. When a
``patient_id`` column exists, every split is by patient; a ``split`` column (train/val/test) is
honoured; ``calib`` is always carved from train, stratified, with the run's seed.

Images are decoded lazily by default (``Split.inputs`` is a list of paths that the image
modality reads with :func:`~meddx.modalities.image.io.read_image` +
:func:`~meddx.modalities.image.io.to_model_grid`); ``preload=True`` decodes each image once onto
the model grid and keeps a float32 tensor ``(N, C, *grid)`` instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from meddx.errors import ConfigError, DataError
from meddx.modalities.base import Split
from meddx.modalities.labelled import (
    infer_folder_task,
    labelled_table,
    limit_split,
    make_splits,
    read_labels_csv,
    split_column,
)
from meddx.tasks import TaskSpec

__all__ = [
    "load_folder_dataset",
    "load_isic2017",
    "infer_folder_task",
    "read_labels_csv",
    "preload_split",
    "ISIC2017_TASK",
    "PRELOAD_MAX_BYTES",
]

logger = logging.getLogger(__name__)

PRELOAD_MAX_BYTES = 2 << 30

ISIC2017_TASK = TaskSpec(kind="multiclass",
                         class_names=["melanoma", "seborrheic_keratosis", "nevus"],
                         positive_class="melanoma")
_ISIC_FOLDERS = {"train": "ISIC-2017_Training_Data", "val": "ISIC-2017_Validation_Data",
                 "test": "ISIC-2017_Test_v2_Data"}
_ISIC_METADATA = {"train": "ISIC-2017_Training_Data_metadata.csv",
                  "val": "ISIC-2017_Validation_Data_metadata.csv"}


def preload_split(split: Split, input_spec: dict[str, Any], *, progress: bool = True) -> Split:
    """Decode every image of ``split`` once onto the model grid → float32 ``(N, C, *grid)``.

    Args:
        split: a split whose inputs are file paths.
        input_spec: ``channels``, ``spatial_dims``, ``size`` and optionally ``normalize``,
            ``window``, ``resize`` (as :func:`~meddx.modalities.image.io.to_model_grid`).
        progress: show a Rich progress bar on a terminal.

    Raises:
        ConfigError: the decoded set would exceed :data:`PRELOAD_MAX_BYTES`.
        DataError / InputMismatchError: an image cannot be read or does not fit the grid.
    """
    from meddx.modalities.image.io import read_image, to_model_grid

    grid = _grid(input_spec)
    nbytes = len(split) * int(input_spec["channels"]) * int(np.prod(grid)) * 4
    if nbytes > PRELOAD_MAX_BYTES:
        raise ConfigError(
            f"preloading split '{split.name}' would take {nbytes / 2**30:.1f} GiB",
            hint="set data.options.preload: false to decode images lazily",
        )
    out = torch.empty((len(split), int(input_spec["channels"]), *grid), dtype=torch.float32)
    for i, path in enumerate(_track(split.inputs, f"decoding {split.name}", progress)):
        image = read_image(path, name=split.ids[i])
        out[i] = to_model_grid(image, **_grid_kwargs(input_spec), name=split.ids[i])
    return Split(name=split.name, inputs=out, targets=split.targets, ids=split.ids,
                 patient_ids=split.patient_ids, metadata=split.metadata)


def _grid(spec: dict[str, Any]) -> tuple[int, ...]:
    size = spec["size"]
    dims = int(spec["spatial_dims"])
    return (int(size),) * dims if isinstance(size, int | np.integer) else tuple(map(int, size))


def _grid_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    keys = ("channels", "spatial_dims", "size", "normalize", "window", "resize")
    kwargs = {k: spec[k] for k in keys if spec.get(k) is not None}
    return kwargs


def _track(items: Sequence[Any], description: str, progress: bool) -> Any:
    from rich.console import Console
    from rich.progress import track

    console = Console(stderr=True)
    return track(items, description=description, console=console, transient=True,
                 disable=not (progress and console.is_terminal))


def _finish(splits: dict[str, Split], task: TaskSpec, seed: int, limit: int | None,
            input_spec: dict[str, Any] | None, preload: bool) -> dict[str, Split]:
    splits = {k: limit_split(s, limit, task, seed) for k, s in splits.items()}
    if preload:
        if input_spec is None:
            raise ConfigError("preload=True needs the input_spec (channels, spatial_dims, size)")
        splits = {k: preload_split(s, input_spec) for k, s in splits.items()}
    return splits


# --------------------------------------------------------------------------- public API
def load_folder_dataset(
    root: str | Path,
    labels_csv: str | Path = "labels.csv",
    *,
    task: TaskSpec | None = None,
    task_kind: str = "multiclass",
    positive_class: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    calib_fraction: float = 0.15,
    input_spec: dict[str, Any] | None = None,
    limit: int | None = None,
    preload: bool = False,
) -> tuple[dict[str, Split], dict[str, Any]]:
    """Read a folder of images and its labels CSV into train/val/calib/test splits.

    Args:
        root: the dataset folder; relative CSV paths are resolved under it.
        labels_csv: the CSV (relative to ``root`` unless absolute).
        task: the label space; None builds one from the CSV's distinct labels
            (``task_kind``, ``positive_class``).
        seed: split seed. val_fraction / test_fraction: shares of the whole set, used when
            the CSV has no ``split`` column (or lacks val/test rows).
        calib_fraction: share of train carved out for calibration (0: none).
        input_spec: the model grid, needed for ``preload``.
        limit: keep at most this many images per split (quick runs, tests).
        preload: decode every image once into a float32 tensor.

    Returns:
        ``(splits, info)``: splits by name, and provenance (CSV, split method, metadata
        columns, whether splits are by patient, the task used).

    Raises:
        DataError: missing files, unknown or empty labels, bad split values, a patient in two
            splits of the CSV's split column.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError("dataset folder not found", path=str(root))
    csv = Path(labels_csv) if Path(labels_csv).is_absolute() else root / labels_csv
    frame = read_labels_csv(csv)
    if task is None:
        task = infer_folder_task(frame["label"].tolist(), task_kind, positive_class)
    table = labelled_table(frame, root, task, csv.name)
    split_col = split_column(frame, csv.name) if "split" in frame.columns else None
    fractions = {"val": val_fraction, "test": test_fraction, "calib": calib_fraction}
    splits, notes = make_splits(table, split_col, task, seed, fractions)
    splits = _finish(splits, task, seed, limit, input_spec, preload)
    info = {
        "labels_csv": str(csv),
        "split_method": "; ".join(notes),
        "patient_level_split": table.patient_ids is not None,
        "metadata_columns": [] if table.metadata is None else list(table.metadata.columns),
        "task": task.model_dump(mode="json"),
        "preloaded": preload,
    }
    logger.info("folder dataset: %s", {k: len(s) for k, s in splits.items()})
    return splits, info


def _isic_frame(root: Path) -> pd.DataFrame:
    frame = _read_isic_labels(root / "labels_derived.csv")
    meta = []
    for split, fname in _ISIC_METADATA.items():
        p = root / fname
        if not p.is_file():
            raise DataError(f"ISIC 2017 metadata file missing: {fname}", path=str(p))
        m = pd.read_csv(p, dtype=str, keep_default_na=False)
        meta.append(m.assign(_split=split))
    meta_frame = pd.concat(meta)[["image_id", "age_approximate", "sex"]]
    frame = frame.merge(meta_frame, on="image_id", how="left", validate="one_to_one")
    folders = frame["split"].map(_ISIC_FOLDERS)
    frame["path"] = folders + "/" + frame["image_id"] + ".jpg"
    frame["label"] = frame["label_3class"]
    age = frame.pop("age_approximate").fillna("")
    sex = frame.pop("sex").fillna("")
    return pd.DataFrame({"path": frame["path"], "label": frame["label"],
                         "split": frame["split"], "age": age, "sex": sex})


def _read_isic_labels(path: Path) -> pd.DataFrame:
    """``labels_derived.csv``, with the 3-class label checked against the two binary columns."""
    if not path.is_file():
        raise DataError("ISIC 2017 labels file missing", path=str(path),
                        hint="the bundled copy lives in dermoscopy/isic2017/labels_derived.csv")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    expected = np.where(frame["melanoma"] == "1", "melanoma",
                        np.where(frame["seborrheic_keratosis"] == "1", "seborrheic_keratosis",
                                 "nevus"))
    bad = frame["label_3class"].to_numpy() != expected
    if bad.any():
        sid = frame["image_id"].iloc[int(np.flatnonzero(bad)[0])]
        raise DataError("ISIC label_3class disagrees with the melanoma/seborrheic_keratosis "
                        "columns", sample_id=sid, path=str(path))
    return frame


def load_isic2017(
    root: str | Path,
    *,
    input_spec: dict[str, Any] | None = None,
    seed: int = 0,
    calib_fraction: float = 0.15,
    limit: int | None = None,
    preload: bool = False,
    task: TaskSpec | None = None,
) -> tuple[dict[str, Split], dict[str, Any]]:
    """ISIC 2017 part 3 (melanoma / seborrheic keratosis / nevus) from its bundled folder.

    train / val / test are the challenge's Training / Validation / Test_v2 sets; calib is
    carved from train. Age (``age_approximate``; "unknown" → NaN) and sex are kept as metadata
    for train, calib and val; the test set has none (``metadata`` is None there).

    Returns:
        ``(splits, info)`` as :func:`load_folder_dataset`.
    """
    root = Path(root)
    task = task or ISIC2017_TASK
    frame = _isic_frame(root)
    table = labelled_table(frame, root, task, "labels_derived.csv")
    split_col = split_column(frame, "labels_derived.csv")
    fractions = {"val": 0.0, "test": 0.0, "calib": calib_fraction}
    splits, _ = make_splits(table, split_col, task, seed, fractions)
    splits["test"].metadata = None  # the test set's age/sex are not bundled
    splits = _finish(splits, task, seed, limit, input_spec, preload)
    info = {
        "labels_csv": str(root / "labels_derived.csv"),
        "split_method": "ISIC 2017 challenge split (Training / Validation / Test_v2); calib "
        f"carved from train (seed {seed}); by image: ISIC 2017 publishes no patient ids",
        "patient_level_split": False,
        "metadata_columns": ["age", "sex"],
        "metadata": {"train": ["age", "sex"], "calib": ["age", "sex"], "val": ["age", "sex"],
                     "test": "none: the ISIC 2017 test metadata is not bundled"},
        "label_notes": "test labels were aligned to images by sorted image id (row order of "
        "the official ground truth; counts match, per-image alignment not verified)",
        "task": task.model_dump(mode="json"),
        "preloaded": preload,
    }
    return splits, info
