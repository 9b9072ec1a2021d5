"""Shared by the evaluation and reporting tests: one evaluation of the tiny BreastMNIST package,
run once per session on a private copy (the package fixture is shared with other areas)."""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


@functools.lru_cache(maxsize=4)
def evaluated(package_dir: str) -> Any:
    """``evaluate()`` of a copy of the package at ``package_dir``, with report, 300 resamples."""
    from meddx.evaluation import evaluate

    root = Path(tempfile.mkdtemp(prefix="meddx-eval-"))
    model = root / "model"
    shutil.copytree(package_dir, model)
    return evaluate(model, out=root / "eval", bootstrap=300, seed=0)
