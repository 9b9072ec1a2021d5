"""FHIR R4 builders (fhir.resources.R4B) and our own invariant checks."""

from __future__ import annotations

import base64
import hashlib
import sys

import pytest

from meddx.errors import DataError, InputMismatchError, ServingError
from meddx.fhir.resources import (
    attachment_from_resource,
    check_invariants,
    diagnostic_report_bundle,
    risk_assessment,
    risk_band,
    validate,
)
from meddx.inference.prediction import Prediction
from meddx.package import Conformal, ModelCard, OperatingPoint
from meddx.tasks import TaskSpec

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


@pytest.fixture
def card() -> ModelCard:
    return ModelCard(
        name="breast", modality="image",
        task=TaskSpec(kind="binary", class_names=["malignant", "benign"],
                      positive_class="malignant"),
        network={"name": "resnet18"}, preprocessing={"spatial_dims": 2, "channels": 1, "size": 28},
        operating_points={
            "sensitivity@0.95": OperatingPoint(method="sensitivity", threshold=0.3,
                                               positive_class="malignant", target=0.95),
            "specificity@0.90": OperatingPoint(method="specificity", threshold=0.7,
                                               positive_class="malignant", target=0.9)},
        default_operating_point="sensitivity@0.95",
        conformal=Conformal(threshold=0.8), research_only=True)


@pytest.fixture
def pred() -> Prediction:
    return Prediction(id="0", probabilities={"malignant": 0.8, "benign": 0.2}, label="malignant",
                      calibrated={"malignant": 0.75, "benign": 0.25}, decision="malignant",
                      operating_point="sensitivity@0.95", threshold=0.3,
                      prediction_set=["malignant"],
                      model={"name": "breast", "version": "1.0.0", "sha256": "a" * 64,
                             "positive_class": "malignant"})


def test_only_r4b_modules_are_used():
    import meddx.fhir.resources  # noqa: F401

    loaded = [m for m in sys.modules if m.startswith("fhir.resources.")
              and not m.startswith(("fhir.resources.R4B", "fhir.resources.core"))
              and m.count(".") == 2 and m.split(".")[2][:1].islower()]
    assert loaded == [], f"default (R5) fhir.resources modules imported: {loaded}"


def test_diagnostic_report_bundle_validates(card, pred):
    from fhir.resources.R4B.bundle import Bundle

    b = diagnostic_report_bundle(pred, card, heatmap_png=PNG, subject="Patient/p1")
    model = Bundle.model_validate(b)
    assert model.type == "collection"
    assert check_invariants(b) == []
    kinds = [e["resource"]["resourceType"] for e in b["entry"]]
    assert kinds.count("Observation") == 2 and "Media" in kinds and "Device" in kinds
    report = b["entry"][0]["resource"]
    assert report["resourceType"] == "DiagnosticReport" and report["status"] == "final"
    assert "malignant" in report["conclusion"] and "research use only" in report["conclusion"].lower()
    malignant = next(e["resource"] for e in b["entry"]
                     if e["resource"]["resourceType"] == "Observation"
                     and e["resource"]["code"]["coding"][0]["code"] == "malignant")
    assert malignant["valueQuantity"]["value"] == 0.75
    assert malignant["interpretation"][0]["coding"][0]["code"] == "POS"
    media = next(e["resource"] for e in b["entry"] if e["resource"]["resourceType"] == "Media")
    assert base64.b64decode(media["content"]["data"]) == PNG
    assert media["content"]["hash"] == base64.b64encode(hashlib.sha1(PNG).digest()).decode()


def test_risk_assessment_validates(card, pred):
    from fhir.resources.R4B.riskassessment import RiskAssessment

    ra = risk_assessment(pred, card, subject="Patient/p1", basis=["Observation/o1"])
    RiskAssessment.model_validate(ra)
    p = ra["prediction"][0]
    assert p["probabilityDecimal"] == 0.75
    assert p["qualitativeRisk"]["coding"][0]["code"] == "high"
    assert ra["basis"] == [{"reference": "Observation/o1"}]
    assert ra["note"][0]["text"] == "research use only — not for diagnosis"


@pytest.mark.parametrize("bad", [{"reference": ""}, {"reference": 5}])
def test_long_basis_is_held_to_r4b_rules(card, pred, bad):
    """A 1,500-reference basis is checked by rule rather than 1,500 R4B objects: what passes
    passes R4B, and an entry R4B rejects is rejected here too."""
    from fhir.resources.R4B.riskassessment import RiskAssessment
    from pydantic import ValidationError

    basis = [f"Observation/o{i}" for i in range(1500)]
    ra = risk_assessment(pred, card, subject="Patient/p1", basis=basis)
    validate(ra)
    RiskAssessment.model_validate(ra)  # the same resource passes R4B in full
    ra["basis"][700] = bad
    with pytest.raises(ValidationError):
        RiskAssessment.model_validate(ra)
    with pytest.raises(ServingError, match=r"basis\[700\]"):
        validate(ra)
    ra["basis"][700] = {"reference": "Observation/x", "display": ["not a string"]}
    with pytest.raises(ServingError):  # not a plain reference: R4B validates it all
        validate(ra)


def test_risk_bands_follow_the_cards_thresholds(card):
    assert risk_band(0.1, card) == "low"
    assert risk_band(0.5, card) == "moderate"
    assert risk_band(0.9, card) == "high"


@pytest.mark.parametrize("resource, problem", [
    ({"resourceType": "Observation", "status": "done", "code": {"text": "x"}}, "status"),
    ({"resourceType": "DiagnosticReport", "status": "ok", "code": {"text": "x"}}, "status"),
    ({"resourceType": "Media", "status": "finished",
      "content": {"contentType": "image/png"}}, "status"),
    ({"resourceType": "RiskAssessment", "status": "final", "subject": {"display": "x"},
      "prediction": [{"probabilityDecimal": 1.5}]}, "probabilityDecimal"),
    ({"resourceType": "RiskAssessment", "status": "final", "subject": {"display": "x"},
      "prediction": [{"qualitativeRisk": {"coding": [
          {"system": "http://terminology.hl7.org/CodeSystem/risk-probability",
           "code": "extreme"}]}}]}, "qualitativeRisk"),
    ({"resourceType": "Bundle", "type": "pile", "entry": []}, "Bundle.type"),
    ({"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Observation", "status": "final",
                                               "code": {"text": "x"},
                                               "device": {"reference": "urn:uuid:2"}}}]},
     "not in the Bundle"),
])
def test_invariants_catch_what_the_models_accept(resource, problem):
    problems = check_invariants(resource)
    assert any(problem in p for p in problems), problems
    with pytest.raises(ServingError):
        validate(resource)


def test_attachments_in(tmp_path):
    data = base64.b64encode(PNG).decode()
    raw, ctype, name = attachment_from_resource(
        {"resourceType": "Binary", "contentType": "image/png", "data": data})
    assert raw == PNG and ctype == "image/png" and name == "binary.png"
    raw, _, _ = attachment_from_resource({"resourceType": "DocumentReference", "status": "current",
                                          "id": "doc-of-jane-doe",
                                          "content": [{"attachment": {"contentType": "image/png",
                                                                      "data": data}}]})
    assert raw == PNG


@pytest.mark.parametrize("resource, error", [
    ({"resourceType": "Patient"}, InputMismatchError),
    ({"resourceType": "Media", "status": "completed",
      "content": {"contentType": "image/png", "url": "http://x/y.png"}}, DataError),
    ({"resourceType": "Media", "status": "completed",
      "content": {"contentType": "image/png", "data": "not base64!!"}}, DataError),
    ({"resourceType": "Media", "status": "completed",
      "content": {"contentType": "image/png", "data": base64.b64encode(PNG).decode(),
                  "size": 3}}, DataError),
    ({"resourceType": "Media", "status": "completed"}, DataError),
])
def test_bad_attachments(resource, error):
    with pytest.raises(error):
        attachment_from_resource(resource)
