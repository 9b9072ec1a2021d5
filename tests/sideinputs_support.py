"""A tiny dermoscopy-like folder dataset whose label depends on the patient's age, and an image
package trained on it with age and sex as side inputs (late fusion on calib)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

CLASSES = ("melanoma", "nevus", "seborrheic_keratosis")


def derm_folder(root: Path, n: int = 150, seed: int = 0) -> Path:
    """``n`` 16×16 RGB noise PNGs; melanoma in the old, nevus in the young, SK in between;
    every 10th age and every 13th sex unknown; a split column (70% train, 15% val, 15%
    test)."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = CLASSES[i % 3]
        age = {"melanoma": 70, "nevus": 25, "seborrheic_keratosis": 50}[label] + rng.normal(0, 6)
        name = f"img/ISIC_{i:07d}.png"
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / name)
        split = "train" if i < 0.7 * n else ("val" if i < 0.85 * n else "test")
        rows.append({"path": name, "label": label, "split": split,
                     "age": "unknown" if i % 10 == 0 else str(round(age)),
                     "sex": "unknown" if i % 13 == 0 else ("male" if i % 2 else "female")})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


def config(root: Path, side_inputs: list[Any] | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "name": "derm-side" if side_inputs else "derm-plain", "seed": 0,
        "data": {"path": str(root), "modality": "image", "size": 16, "calib_fraction": 0.35,
                 "options": {"format": "folder"}},
        "task": {"kind": "multiclass", "class_names": list(CLASSES), "positive_class": "melanoma"},
        "model": {"name": "resnet18", "options": {"widen_factor": 0.25}},
        "train": {"epochs": 1, "batch_size": 32, "early_stopping_patience": None,
                  "precision": "32", "augment": {"enabled": False}},
    }
    if side_inputs is not None:
        cfg["side_inputs"] = side_inputs
    return cfg


@functools.lru_cache(maxsize=2)
def trained(side: bool = True) -> tuple[Any, Path]:
    """(package, data folder): one epoch on the folder, side inputs age and sex when ``side``
    (built once per session; callers copy it before changing it)."""
    from meddx.training import train

    root = Path(tempfile.mkdtemp(prefix="meddx-side-"))
    data = derm_folder(root / "data")
    package = train(config(data, ["age", "sex"] if side else None), out=root / "run",
                    progress=False)
    return package, data
