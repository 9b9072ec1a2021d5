"""A slide prediction as FHIR R4B: a pathology DiagnosticReport with the heat map as Media.

Built with the core helpers of :mod:`meddx.fhir.resources` (Device, per-class Observations,
conclusion), then marked as a pathology report: category ``LP7839-6`` (Pathology, LOINC) and
``PAT`` (HL7 v2 diagnostic service section), the Media titled as the attention heat map over
the slide thumbnail. The Bundle is validated with ``fhir.resources.R4B``. The slide's label and
macro images are never part of it.
"""

from __future__ import annotations

from typing import Any

from meddx.fhir.resources import diagnostic_report_bundle, validate

__all__ = ["slide_report_bundle", "PATHOLOGY_CATEGORY"]

PATHOLOGY_CATEGORY = {"coding": [
    {"system": "http://loinc.org", "code": "LP7839-6", "display": "Pathology"},
    {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "PAT",
     "display": "Pathology (gross & histopath, not surgical)"}]}


def slide_report_bundle(prediction: Any, card: Any, *, heatmap_png: bytes | None = None,
                        subject: str | None = None, research_only: bool | None = None,
                        n_tiles: int | None = None) -> dict[str, Any]:
    """A validated collection Bundle: DiagnosticReport (pathology), Observations, Device and,
    with ``heatmap_png``, a Media holding the attention heat map over the slide thumbnail.

    Args:
        prediction: the slide's :class:`~meddx.inference.prediction.Prediction` (or dict).
        card: the slide model's card.
        heatmap_png: the heat map PNG.
        subject: ``Patient/<id>`` when known.
        research_only: carry the research notice (default: the card's flag).
        n_tiles: tiles the prediction read (stated in the report's text).
    """
    bundle = diagnostic_report_bundle(prediction, card, heatmap_png=heatmap_png,
                                      subject=subject, research_only=research_only)
    for entry in bundle["entry"]:
        r = entry["resource"]
        if r["resourceType"] == "DiagnosticReport":
            r["category"] = [PATHOLOGY_CATEGORY]
            r["code"]["text"] = f"meddx {card.name} {card.version} whole-slide image analysis"
            if n_tiles is not None:
                r["conclusion"] = (f"Whole slide read as {n_tiles} tissue tiles. "
                                   + r["conclusion"]).strip()
            if "media" in r:
                r["media"][0]["comment"] = "attention heat map over the slide thumbnail"
        elif r["resourceType"] == "Observation":
            r["category"] = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                          "observation-category", "code": "laboratory"}]}]
        elif r["resourceType"] == "Media":
            r["content"]["title"] = "attention heat map over the slide thumbnail"
    validate(bundle)
    return bundle
