"""The package's out-of-distribution detector at prediction time.

Features are taken in one modality-independent way: the **input of the network's last
``nn.Linear`` whose width is the task's number of outputs** (the layer feeding the logits:
ResNet's ``fc``, GRU-D's ``head.4``, an MLP's last layer), read with a forward hook.
Networks without such a layer (e.g. the GRU-D ensemble, whose heads are batched matrix
products) get the logit-based energy score instead; :func:`detector_method` decides, at
training time, and the card records which one a package uses.

The ONNX export of a package with a Mahalanobis detector has a second output ``features``
(:mod:`meddx.inference.onnx`), so the ONNX backend flags the same inputs without a torch pass.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from meddx.errors import ModelError
from meddx.package import ModelPackage, OODDetector
from meddx.statistics.ood import MahalanobisScorer, energy_score

__all__ = ["OOD_FILE", "head_layer", "FeatureTap", "Detector", "load_detector",
           "detector_method", "save_detector_arrays"]

OOD_FILE = "ood.safetensors"


def head_layer(model: torch.nn.Module, num_outputs: int) -> tuple[str, torch.nn.Linear] | None:
    """The last registered ``nn.Linear`` with ``num_outputs`` outputs (name, module), or None."""
    found = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.out_features == num_outputs:
            found = (name, module)
    return found


def detector_method(model: torch.nn.Module, num_outputs: int, example: Any) -> str:
    """"mahalanobis" when the head layer runs exactly once per forward on ``(N, D)`` inputs
    (checked on ``example``), else "energy"."""
    head = head_layer(model, num_outputs)
    if head is None:
        return "energy"
    tap = FeatureTap(head[1], head[0])
    try:
        with torch.inference_mode():
            out = model(example)
        features = tap.pop()
    finally:
        tap.remove()
    ok = features is not None and features.ndim == 2 and features.shape[0] == out.shape[0]
    return "mahalanobis" if ok else "energy"


class FeatureTap:
    """A forward hook that keeps the input of ``layer`` of the current thread's last forward.

    Thread-local, so concurrent requests of the service never read each other's features; a
    layer called more than once in one forward (shared heads) leaves no features.
    """

    def __init__(self, layer: torch.nn.Module, name: str) -> None:
        self.name = name
        self._local = threading.local()
        self._handle = layer.register_forward_hook(self._hook)

    def __deepcopy__(self, memo: dict[int, Any]) -> FeatureTap:
        # a deep copy of the network (an explainer's) keeps its hook pointing here; the
        # Predictor resets the tap before each of its own forwards
        return self

    def reset(self) -> None:
        self._local.features, self._local.calls = None, 0

    def _hook(self, module: torch.nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        self._local.calls = getattr(self._local, "calls", 0) + 1
        self._local.features = inputs[0]

    def pop(self) -> np.ndarray | None:
        """Features of the last forward (N, D) as float32, or None; resets the tap."""
        features, calls = getattr(self._local, "features", None), getattr(self._local, "calls", 0)
        self.reset()
        if features is None or calls != 1:
            return None
        return features.detach().float().reshape(features.shape[0], -1).cpu().numpy()

    def remove(self) -> None:
        self._handle.remove()


class Detector:
    """A loaded detector: ``scores(logits, features)`` and ``flags(scores)``."""

    def __init__(self, spec: OODDetector, scorer: MahalanobisScorer | None) -> None:
        self.spec = spec
        self.scorer = scorer

    @property
    def needs_features(self) -> bool:
        return self.spec.method == "mahalanobis"

    def scores(self, logits: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        if self.scorer is None:
            return energy_score(logits)
        if features is None:
            raise ModelError("the OOD detector needs the network's features and got none",
                             hint="re-export the package (`meddx export MODEL --onnx`)")
        return self.scorer.score(features)

    def flags(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.spec.threshold


def save_detector_arrays(path: Path, scorer: MahalanobisScorer) -> None:
    """Write means and precision (float64) as safetensors."""
    save_file({"means": np.ascontiguousarray(scorer.means_),
               "precision": np.ascontiguousarray(scorer.precision_)}, str(path))


def load_detector(package: ModelPackage) -> Detector | None:
    """The package's detector, or None for a package without one (older packages).

    Raises:
        ModelError: the card names a detector file the manifest does not list.
    """
    spec = package.card.ood
    if spec is None:
        return None
    if spec.method == "energy":
        return Detector(spec, None)
    name = spec.file or OOD_FILE
    if name not in package.manifest:
        raise ModelError(f"the card's OOD detector needs {name}, which the package lacks",
                         path=str(package.path))
    arrays = load_file(str(package.path / name))  # sha256 checked by load_package
    return Detector(spec, MahalanobisScorer.from_arrays(arrays["means"], arrays["precision"]))
