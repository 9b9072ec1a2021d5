"""The types the DICOM writers, the outbox and the pipeline share.

A :class:`SeriesAnalysis` is one model's answer on one series (or study): the instances it read,
the Prediction for the series, and optionally per-image answers and heat maps. The writers in
:mod:`meddx.dicom.results` turn it into DICOM objects for the source study.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meddx.errors import ConfigError
from meddx.inference.prediction import Prediction

__all__ = ["Algorithm", "SeriesAnalysis"]


@dataclass(frozen=True)
class Algorithm:
    """Which model answered: the SR's algorithm identification.

    Attributes:
        name: the package's card name.
        version: the package's card version.
        package_sha256: the sha256 that identifies the package's weights (its manifest entry).
    """

    name: str
    version: str
    package_sha256: str

    def __post_init__(self) -> None:
        if not self.name or not self.version:
            raise ConfigError("an algorithm needs a name and a version",
                              hint="set name and version in the package's card")
        digest = self.package_sha256
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ConfigError(f"package_sha256 must be 64 lower-case hex digits, got {digest!r}",
                              hint="use ModelPackage.sha256")

    @classmethod
    def from_predictor(cls, predictor: Any) -> Algorithm:
        """The identification of a loaded :class:`meddx.inference.Predictor`."""
        card = predictor.card
        return cls(name=str(card.name), version=str(card.version),
                   package_sha256=str(predictor.package.sha256))


@dataclass(frozen=True)
class SeriesAnalysis:
    """One model's answer on one series (or study): the input of the DICOM writers.

    Attributes:
        study_uid: Study Instance UID of the source study (results go into it).
        series_uid: Series Instance UID of the analysed series.
        sources: the analysed instance files on disk.
        algorithm: which model answered.
        prediction: the series-level answer (calibrated probability, decision, operating
            point, threshold, conformal set, OOD flag).
        per_image: for 2D models, (SOP Instance UID, prediction) per analysed image.
        heatmaps: (SOP Instance UID, H×W array in [0, 1] on that instance's pixel grid).
        aggregation: how the series answer was made from the images (said in the SR).
        slide: the source is a whole-slide image (slide-level SR + attention map).
    """

    study_uid: str
    series_uid: str
    sources: tuple[Path, ...]
    algorithm: Algorithm
    prediction: Prediction
    per_image: tuple[tuple[str, Prediction], ...] = ()
    heatmaps: tuple[tuple[str, np.ndarray], ...] = ()
    aggregation: str = ""
    slide: bool = False

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("a series analysis needs at least one source instance",
                              hint="pass the instance files the model read")
        for uid, heat in self.heatmaps:
            arr = np.asarray(heat)
            if arr.ndim != 2:
                raise ConfigError(f"heat map for instance {uid} must be 2-D (H×W), "
                                  f"got shape {arr.shape}", hint="one map per image")
