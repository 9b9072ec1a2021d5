"""The Prediction object every surface (CLI, Python, REST, FHIR, CDS Hooks) returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Prediction"]


@dataclass
class Prediction:
    """One model answer for one input.

    Attributes:
        id: the input's identifier (file name, record name, index).
        probabilities: raw model probability per class name.
        label: most probable class (multilabel: labels with p ≥ 0.5; regression: the value).
        calibrated: probabilities after temperature scaling (None without calibration).
        decision: at the card's operating point, the positive class name or "not <positive>"
            (multilabel: per-label decision), None when the card has no operating point.
        operating_point: the operating point's name (e.g. "sensitivity@0.95").
        threshold: the threshold applied to the positive class's (calibrated) probability.
        prediction_set: the conformal set of class names (multilabel: labels whose set
            contains "present" only … see ``label_sets``), None without conformal calibration.
        refer: the conformal set is not a single class: refer to a human.
        review: the decision and the conformal set disagree: flagged for review, never resolved
            silently.
        label_sets: multilabel only: per label the conformal set ("present"/"absent").
        explanation: a heat map or attribution array (not serialised to JSON).
        model: name, version and weights sha256 of the answering model.
        notes: anything the user must know about this answer (e.g. hours of data used).
        ood: the input is outside what the model was trained on (its detector's score is
            above the card's threshold): no decision is made. None: the package has no
            detector.
        ood_score: the detector's score (higher: less like the training data).
    """

    id: str
    probabilities: dict[str, float]
    label: str | list[str] | float
    calibrated: dict[str, float] | None = None
    decision: str | dict[str, bool] | None = None
    operating_point: str | None = None
    threshold: float | None = None
    prediction_set: list[str] | None = None
    refer: bool = False
    review: bool = False
    label_sets: dict[str, list[str]] | None = None
    explanation: np.ndarray | None = field(default=None, repr=False)
    model: dict[str, str] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    ood: bool | None = None
    ood_score: float | None = None

    @property
    def risk(self) -> float | None:
        """Calibrated (else raw) probability of the decision's positive class, if any."""
        probs = self.calibrated or self.probabilities
        pos = self.model.get("positive_class")
        return probs.get(pos) if pos else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (the explanation array is left out)."""
        out: dict[str, Any] = {
            "id": self.id,
            "label": self.label,
            "probabilities": {k: round(float(v), 6) for k, v in self.probabilities.items()},
            "calibrated": {k: round(float(v), 6) for k, v in self.calibrated.items()}
            if self.calibrated
            else None,
            "decision": self.decision,
            "operating_point": self.operating_point,
            "threshold": self.threshold,
            "prediction_set": self.prediction_set,
            "refer": self.refer,
            "review": self.review,
            "model": self.model,
            "ood": self.ood,
            "ood_score": None if self.ood_score is None else round(float(self.ood_score), 6),
        }
        if self.label_sets is not None:
            out["label_sets"] = self.label_sets
        if self.notes:
            out["notes"] = self.notes
        return out
