"""FHIR R4 (``fhir.resources.R4B``) mapping of a sequence-model prediction: an Observation."""

from __future__ import annotations

from typing import Any

from meddx.errors import ConfigError

__all__ = ["observation"]

_UCUM = "http://unitsofmeasure.org"


def observation(prediction: Any, card: Any, what: str) -> dict[str, Any]:
    """An ``Observation`` (status final) whose value is the predicted class and whose components
    are the (calibrated, else raw) class probabilities; validated by ``fhir.resources.R4B``.

    Args:
        prediction: a :class:`meddx.inference.Prediction`.
        card: the package's :class:`meddx.package.ModelCard`.
        what: what was analysed, for the code text (e.g. "DNA sequence").
    """
    try:
        from fhir.resources.R4B.observation import Observation
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ConfigError("FHIR output needs fhir.resources: pip install 'meddx[serve]'") from e
    probs = prediction.calibrated or prediction.probabilities
    label = prediction.label
    value = ", ".join(label) if isinstance(label, list) else str(label)
    sha = prediction.model.get("sha256", "")
    body = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": f"{card.name}: {card.task.describe()} from a {what}"},
        "valueCodeableConcept": {"text": value or "none"},
        "method": {"text": f"meddx model {card.name} {card.version} "
                           f"({card.network.get('name')}, weights sha256 {sha[:12]})"},
        "component": [
            {"code": {"text": f"probability of {name}"},
             "valueQuantity": {"value": round(float(p), 6), "unit": "1", "system": _UCUM,
                               "code": "1"}}
            for name, p in probs.items()
        ],
        "note": [{"text": ("Research use only; not for diagnosis. " if card.research_only else "")
                  + f"Input id: {prediction.id}."}],
    }
    return Observation.model_validate(body).model_dump(mode="json", exclude_none=True)
