"""Datasets given as a table of labelled files: ``path,label[,patient_id][,split][,metadata…]``.

Shared by the modality folders that read files listed in a CSV (images, whole slides). Labels
are matched exactly against the task's classes (an unknown label is a :class:`DataError` naming
the file); metadata columns are kept per split for subgroup analysis; with a ``patient_id``
column every split is by patient; a ``split`` column (train/val/test) is honoured; ``calib`` is
always carved from train, stratified, with the run's seed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from meddx.errors import DataError
from meddx.modalities.splitting import Split, carve_split
from meddx.tasks import TaskSpec

__all__ = ["RESERVED", "read_labels_csv", "infer_folder_task", "labelled_table", "make_splits",
           "split_column", "limit_split", "encode_label", "metadata_frame"]

logger = logging.getLogger(__name__)

RESERVED = ("path", "label", "patient_id", "split")
_SPLIT_VALUES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
_MISSING = {"", "unknown", "na", "n/a", "nan", "none", "null", "?", "-"}


# ------------------------------------------------------------------------------- the CSV
def read_labels_csv(path: str | Path) -> pd.DataFrame:
    """The labels CSV as strings (nothing converted), with ``path`` and ``label`` checked.

    Raises:
        DataError: the file is missing, unreadable, or lacks the ``path``/``label`` columns.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError("labels CSV not found", path=str(p),
                        hint="a folder dataset needs a CSV with columns path,label")
    try:
        frame = pd.read_csv(p, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as e:
        raise DataError(f"labels CSV cannot be parsed ({e})", path=str(p)) from e
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in ("path", "label") if c not in frame.columns]
    if missing:
        raise DataError(
            f"labels CSV lacks column(s) {missing}; found {list(frame.columns)}",
            path=str(p),
            hint="columns: path,label[,patient_id][,split][,metadata…]",
        )
    if frame.empty:
        raise DataError("labels CSV has no rows", path=str(p))
    return frame


def infer_folder_task(labels: Sequence[str], kind: str = "multiclass",
                      positive_class: str | None = None) -> TaskSpec:
    """A task whose classes are the sorted distinct labels of the CSV (exact strings)."""
    if kind == "multilabel":
        names = sorted({n.strip() for cell in labels for n in str(cell).split("|") if n.strip()})
        return TaskSpec(kind="multilabel", class_names=names)
    if kind == "regression":
        return TaskSpec(kind="regression", class_names=["value"])
    return TaskSpec.from_labels(kind, [str(v).strip() for v in labels], positive_class)


def encode_label(task: TaskSpec, raw: str, sample_id: str) -> Any:
    raw = raw.strip()
    if raw == "":
        raise DataError("image has an empty label", sample_id=sample_id,
                        hint="fill in the label or remove the row")
    if task.kind != "multilabel":
        return task.encode(raw, sample_id)
    names = [n.strip() for n in raw.split("|") if n.strip()]
    unknown = [n for n in names if n not in task.class_names]
    if unknown:
        raise DataError(f"labels {unknown} are not among the task's labels {task.class_names}",
                        sample_id=sample_id, hint="multilabel cells are names joined by '|'")
    return task.encode([float(c in names) for c in task.class_names], sample_id)


def metadata_frame(frame: pd.DataFrame) -> pd.DataFrame | None:
    """Non-reserved columns; numeric where every present value is a number."""
    cols = [c for c in frame.columns if c not in RESERVED]
    if not cols:
        return None
    out = {}
    for c in cols:
        values = frame[c].astype(str).str.strip()
        missing = values.str.lower().isin(_MISSING)
        numbers = pd.to_numeric(values.where(~missing), errors="coerce")
        if numbers[~missing].notna().all() and (~missing).any():
            out[c] = numbers.astype(float)
        else:
            out[c] = values.where(values != "", np.nan)
    return pd.DataFrame(out).reset_index(drop=True)


def resolve_paths(frame: pd.DataFrame, root: Path, csv_name: str) -> list[str]:
    paths, missing = [], []
    for row, rel in enumerate(frame["path"].astype(str).str.strip(), start=2):
        if not rel:
            raise DataError(f"row {row} of the labels CSV has an empty path", path=csv_name)
        p = Path(rel) if Path(rel).is_absolute() else root / rel
        if not p.is_file():
            missing.append((row, rel))
        paths.append(str(p))
    if missing:
        row, rel = missing[0]
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(
            f"image file listed in row {row} of the labels CSV does not exist: {rel}{more}",
            path=str(root / rel),
            hint="fix the path (relative paths are under the dataset root) or remove the row",
        )
    return paths


def labelled_table(frame: pd.DataFrame, root: Path, task: TaskSpec, csv_name: str) -> Split:
    """All rows as one split named ``all``."""
    paths = resolve_paths(frame, root, csv_name)
    ids = frame["path"].astype(str).str.strip().tolist()
    dupes = pd.Index(ids)[pd.Index(ids).duplicated()]
    if len(dupes):
        raise DataError(f"image '{dupes[0]}' is listed twice in the labels CSV", path=csv_name)
    targets = [encode_label(task, str(raw), sid) for raw, sid in zip(frame["label"], ids, strict=True)]
    dtype = np.float32 if task.kind in ("multilabel", "regression") else np.int64
    patient_ids = None
    if "patient_id" in frame.columns:
        pid = frame["patient_id"].astype(str).str.strip()
        if (pid == "").any():
            row = int(np.flatnonzero(pid.to_numpy() == "")[0]) + 2
            raise DataError(f"row {row} of the labels CSV has no patient_id", path=csv_name,
                            hint="fill in every patient_id, or drop the column")
        patient_ids = pid.tolist()
    return Split(name="all", inputs=paths, targets=np.asarray(np.stack(targets), dtype=dtype),
                 ids=ids, patient_ids=patient_ids, metadata=metadata_frame(frame))


# -------------------------------------------------------------------------------- splits
def class_strata(task: TaskSpec, split: Split) -> np.ndarray | None:
    if task.kind in ("binary", "multiclass", "ordinal"):
        return task.target_index(split.targets)
    return None


def carve(split: Split, fraction: float, seed: int, task: TaskSpec, name: str,
           rest_name: str) -> tuple[Split, Split]:
    return carve_split(split, fraction, seed, class_strata(task, split), name, rest_name)


def split_column(frame: pd.DataFrame, csv_name: str) -> np.ndarray:
    raw = frame["split"].astype(str).str.strip().str.lower()
    bad = ~raw.isin(list(_SPLIT_VALUES))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        value = frame["split"].iloc[row]
        hint = ("calib is always carved from train; mark those rows 'train'"
                if str(value).strip().lower().startswith("calib") else "use train, val or test")
        raise DataError(f"row {row + 2} of the labels CSV has split '{value}'", path=csv_name,
                        hint=hint)
    return raw.map(_SPLIT_VALUES).to_numpy()


def check_patients_apart(splits: dict[str, Split]) -> None:
    owner: dict[str, str] = {}
    for name, s in splits.items():
        for pid, sid in zip(s.patient_ids or [], s.ids, strict=False):
            if owner.setdefault(pid, name) != name:
                raise DataError(
                    f"image '{sid}' is in split '{name}' but its patient also has images in "
                    f"'{owner[pid]}'",
                    hint="put all images of a patient in one split (or drop the split column "
                    "and let meddx split by patient)",
                )


def make_splits(table: Split, split_col: np.ndarray | None, task: TaskSpec, seed: int,
                 fractions: dict[str, float]) -> tuple[dict[str, Split], list[str]]:
    notes: list[str] = []
    if split_col is not None:
        parts = {k: table.subset(np.flatnonzero(split_col == k), k)
                 for k in ("train", "val", "test") if (split_col == k).any()}
        if "train" not in parts:
            raise DataError("the labels CSV's split column marks no image as 'train'")
        check_patients_apart(parts)
        notes.append("train/val/test from the CSV's split column")
    else:
        parts = {"train": table.subset(np.arange(len(table)), "train")}
        if fractions["test"] > 0:
            parts["train"], parts["test"] = carve(parts["train"], fractions["test"], seed, task,
                                                   "test", "train")
        notes.append(f"random split, seed {seed}" + (", by patient" if table.patient_ids else ""))
    if "val" not in parts and fractions["val"] > 0:
        share = fractions["val"] / (1 - (0 if split_col is not None else fractions["test"]))
        parts["train"], parts["val"] = carve(parts["train"], min(share, 0.5), seed, task, "val",
                                              "train")
        if split_col is not None:
            notes.append("val carved from train (the CSV has no val rows)")
    if fractions["calib"] > 0:
        parts["train"], parts["calib"] = carve(parts["train"], fractions["calib"], seed, task,
                                                "calib", "train")
    order = ("train", "val", "calib", "test")
    return {k: parts[k] for k in order if k in parts}, notes


def limit_split(split: Split, limit: int | None, task: TaskSpec, seed: int) -> Split:
    """At most ``limit`` samples, stratified when every class can be kept."""
    if not limit or len(split) <= limit:
        return split
    from sklearn.model_selection import train_test_split

    strata = class_strata(task, split)
    if strata is not None:
        counts = np.bincount(strata)
        if (counts[counts > 0] < 2).any() or limit < (counts > 0).sum():
            strata = None
    keep, _ = train_test_split(np.arange(len(split)), train_size=limit, random_state=seed,
                               stratify=strata)
    return split.subset(np.sort(keep))


# ------------------------------------------------------------------------------- preload
