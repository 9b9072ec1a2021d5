"""meddx: deep learning in medicine, from dataset to bedside.

Public API (imported lazily so ``import meddx`` stays fast)::

    from meddx import train, load_model, evaluate
    package = train("configs/breastmnist.yaml")
    predictor = load_model("runs/breast/model")
    predictions = predictor.predict(["img.png"])
"""

from __future__ import annotations

from typing import Any

from meddx.version import __version__

__all__ = ["__version__", "train", "load_model", "evaluate", "load_package"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from meddx.training import train

        return train
    if name == "load_model":
        from meddx.inference import load_model

        return load_model
    if name == "evaluate":
        from meddx.evaluation import evaluate

        return evaluate
    if name == "load_package":
        from meddx.package import load_package

        return load_package
    raise AttributeError(f"module 'meddx' has no attribute {name!r}")
