"""FHIR R4 resources in and out, built and validated with ``fhir.resources.R4B`` only.

(The package's default modules are R5, where ``Media`` no longer exists; they are never
imported here.) Every resource leaves through :func:`validate`, which runs the R4B model and then
our own checks of what the models accept but R4 forbids: code bindings of ``status`` and other
required value sets, probabilities in range, and ``urn:uuid`` references that resolve inside the
Bundle.

Out: :func:`diagnostic_report_bundle` (DiagnosticReport + one Observation per finding + the
heat map as a Media + the model as a Device) and :func:`risk_assessment`.
In: :func:`attachment_from_resource` reads a Binary, Media or DocumentReference attachment.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from meddx.errors import DataError, InputMismatchError, ServingError

__all__ = [
    "decision_note",
    "diagnostic_report_bundle",
    "risk_assessment",
    "device_resource",
    "validate",
    "check_invariants",
    "attachment_from_resource",
    "risk_band",
    "RESEARCH_NOTICE",
    "MEDDX_SYSTEM",
]

RESEARCH_NOTICE = "research use only — not for diagnosis"
MEDDX_SYSTEM = "https://meddx.dev/fhir/CodeSystem"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
RISK_PROBABILITY = "http://terminology.hl7.org/CodeSystem/risk-probability"
UCUM = "http://unitsofmeasure.org"

# Required bindings (R4) that fhir.resources does not enforce.
_STATUS = {
    "Observation": {"registered", "preliminary", "final", "amended", "corrected", "cancelled",
                    "entered-in-error", "unknown"},
    "DiagnosticReport": {"registered", "partial", "preliminary", "final", "amended", "corrected",
                         "appended", "cancelled", "entered-in-error", "unknown"},
    "Media": {"preparation", "in-progress", "not-done", "on-hold", "stopped", "completed",
              "entered-in-error", "unknown"},
    "RiskAssessment": {"registered", "preliminary", "final", "amended", "corrected", "cancelled",
                       "entered-in-error", "unknown"},
    "Device": {"active", "inactive", "entered-in-error", "unknown"},
    "DocumentReference": {"current", "superseded", "entered-in-error"},
    "ServiceRequest": {"draft", "active", "on-hold", "revoked", "completed", "entered-in-error",
                       "unknown"},
}
_INTENT = {"proposal", "plan", "directive", "order", "original-order", "reflex-order",
           "filler-order", "instance-order", "option"}
_BUNDLE_TYPES = {"document", "message", "transaction", "transaction-response", "batch",
                 "batch-response", "history", "searchset", "collection"}
_DEVICE_NAME_TYPES = {"udi-label-name", "user-friendly-name", "patient-reported-name",
                      "manufacturer-name", "model-name", "other"}
_QUALITATIVE = {"negligible", "low", "moderate", "high", "certain"}
_OBS_CATEGORIES = {"social-history", "vital-signs", "imaging", "laboratory", "procedure",
                   "survey", "exam", "therapy", "activity"}


def _urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _pred(prediction: Any) -> dict[str, Any]:
    return prediction.to_dict() if hasattr(prediction, "to_dict") else dict(prediction)


def _notes(research_only: bool) -> list[dict[str, str]]:
    return [{"text": RESEARCH_NOTICE}] if research_only else []


def device_resource(card: Any, sha256: str, research_only: bool | None = None) -> dict[str, Any]:
    """The model as a FHIR Device (name, version, weights sha256)."""
    research = card.research_only if research_only is None else research_only
    device: dict[str, Any] = {
        "resourceType": "Device",
        "status": "active",
        "identifier": [{"system": "urn:meddx:weights-sha256", "value": sha256}],
        "deviceName": [{"name": f"meddx {card.name}", "type": "model-name"}],
        "version": [{"value": card.version}],
        "type": {"text": "AI/ML software (meddx model package)"},
    }
    if research:
        device["note"] = _notes(True)
    return device


def _finding(name: str, p: dict[str, Any], card: Any, subject: dict | None, device_ref: str,
             research: bool) -> dict[str, Any]:
    probs = p["calibrated"] or p["probabilities"]
    value = float(probs[name])
    components = [{
        "code": {"text": "raw model probability"},
        "valueQuantity": {"value": round(float(p["probabilities"][name]), 6), "unit": "1",
                          "system": UCUM, "code": "1"},
    }]
    if p.get("prediction_set") is not None:
        components.append({"code": {"text": "in conformal prediction set"},
                           "valueBoolean": name in p["prediction_set"]})
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": OBS_CATEGORY, "code": "imaging"}]}],
        "code": {"coding": [{"system": f"{MEDDX_SYSTEM}/finding", "code": name}],
                 "text": f"Probability of {name} ({card.name})"},
        "valueQuantity": {"value": round(value, 6), "unit": "1", "system": UCUM, "code": "1"},
        "device": {"reference": device_ref},
        "component": components,
        "issued": _now(),
    }
    op_class = p.get("model", {}).get("positive_class")
    if isinstance(p.get("decision"), str) and name == op_class:
        positive = p["decision"] == op_class
        obs["interpretation"] = [{"coding": [{"system": INTERPRETATION,
                                              "code": "POS" if positive else "NEG"}],
                                  "text": p["decision"]}]
        obs["referenceRange"] = [{"text": f"decision threshold {p['threshold']:.3f} "
                                          f"({p['operating_point']})"}]
    if subject:
        obs["subject"] = subject
    if research:
        obs["note"] = _notes(True)
    return obs


def conclusion_text(prediction: Any, card: Any, research_only: bool | None = None) -> str:
    """One paragraph stating the decision, probability, conformal set and referral."""
    p = _pred(prediction)
    probs = p["calibrated"] or p["probabilities"]
    kind = "calibrated probability" if p["calibrated"] else "probability"
    parts = []
    if isinstance(p.get("decision"), str):
        pos = p["model"].get("positive_class")
        parts.append(f"Decision: {p['decision']} at operating point {p['operating_point']} "
                     f"({kind} of {pos} {probs.get(pos, float('nan')):.1%}, "
                     f"threshold {p['threshold']:.3f}).")
    elif isinstance(p.get("label"), str):
        parts.append(f"Most probable: {p['label']} ({kind} {probs.get(p['label'], 0.0):.1%}).")
    if p.get("prediction_set") is not None:
        parts.append("Conformal prediction set: {" + ", ".join(p["prediction_set"]) + "}.")
    if p.get("refer"):
        parts.append("The model is uncertain: refer for expert review.")
    if p.get("review"):
        parts.append("Decision and prediction set disagree: flagged for review.")
    research = card.research_only if research_only is None else research_only
    if research:
        parts.append(RESEARCH_NOTICE.capitalize() + ".")
    return " ".join(parts)


def diagnostic_report_bundle(prediction: Any, card: Any, *, sha256: str | None = None,
                             heatmap_png: bytes | None = None, subject: str | None = None,
                             research_only: bool | None = None) -> dict[str, Any]:
    """A validated collection Bundle: DiagnosticReport, per-class Observations, Device, Media.

    Args:
        prediction: a :class:`~meddx.inference.prediction.Prediction` (or its ``to_dict()``).
        card: the model card.
        sha256: weights digest (default: ``prediction.model["sha256"]``).
        heatmap_png: the Grad-CAM overlay; becomes a Media linked from ``DiagnosticReport.media``.
        subject: ``Patient/<id>`` when known (CDS Hooks context), else no subject.
        research_only: carry the research notice (default: the card's flag).
    """
    p = _pred(prediction)
    research = card.research_only if research_only is None else research_only
    subj = {"reference": subject} if subject else None
    dev_urn = _urn()
    entries: list[tuple[str, dict[str, Any]]] = [
        (dev_urn, device_resource(card, sha256 or p["model"].get("sha256", ""), research))]
    names = list((p["calibrated"] or p["probabilities"]).keys())
    obs_urns = []
    for name in names:
        urn = _urn()
        obs_urns.append(urn)
        entries.append((urn, _finding(name, p, card, subj, dev_urn, research)))
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "category": [{"coding": [{"system": OBS_CATEGORY, "code": "imaging"}]}],
        "code": {"coding": [{"system": f"{MEDDX_SYSTEM}/model", "code": card.name}],
                 "text": f"meddx {card.name} {card.version} image analysis"},
        "issued": _now(),
        "result": [{"reference": u} for u in obs_urns],
        "conclusion": conclusion_text(p, card, research),
    }
    if subj:
        report["subject"] = subj
    if heatmap_png is not None:
        media_urn = _urn()
        media = {
            "resourceType": "Media",
            "status": "completed",
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/media-type",
                                 "code": "image"}]},
            "content": {"contentType": "image/png",
                        "data": base64.b64encode(heatmap_png).decode("ascii"),
                        "size": len(heatmap_png),
                        "hash": base64.b64encode(hashlib.sha1(heatmap_png).digest()).decode(),
                        "title": "Grad-CAM heat map over the input image"},
            "device": {"reference": dev_urn},
        }
        if subj:
            media["subject"] = subj
        if research:
            media["note"] = _notes(True)
        report["media"] = [{"comment": "Grad-CAM heat map", "link": {"reference": media_urn}}]
        entries.append((media_urn, media))
    bundle = {"resourceType": "Bundle", "type": "collection", "timestamp": _now(),
              "entry": [{"fullUrl": u, "resource": r}
                        for u, r in [(_urn(), report), *entries]]}
    validate(bundle)
    return bundle


def risk_band(risk: float, card: Any, prediction: Any | None = None) -> str:
    """``low`` / ``moderate`` / ``high`` from the card's operating-point thresholds.

    A modality may decide the band itself (``prediction.notes["risk_band"]``). Otherwise the
    thresholds of the card's operating points for the positive class split the scale: below the
    lowest → low, at or above the highest → high, between → moderate (one threshold: low/high).
    """
    notes = getattr(prediction, "notes", None) or {}
    if notes.get("risk_band") in _QUALITATIVE:
        return str(notes["risk_band"])
    pos = card.task.positive_class
    cuts = sorted({op.threshold for op in card.operating_points.values()
                   if op.positive_class == pos})
    if not cuts:
        return "high" if risk >= 0.5 else "low"
    if risk >= cuts[-1]:
        return "high"
    if risk < cuts[0]:
        return "low"
    return "moderate"


def decision_note(prediction: Any) -> str | None:
    """``"Alert: risk at or above the threshold 23.4% of operating point balanced."``, from a
    Prediction (or its dict) with a decision; None without one."""
    p = _pred(prediction)
    pos = (p.get("model") or {}).get("positive_class")
    if not isinstance(p.get("decision"), str) or not pos or p.get("threshold") is None:
        return None
    above = p["decision"] == pos
    return (f"{'Alert' if above else 'No alert'}: risk {'at or above' if above else 'below'} "
            f"the threshold {float(p['threshold']):.1%} of operating point "
            f"{p.get('operating_point')}.")


def risk_assessment(prediction: Any, card: Any, *, subject: str | None = None,
                    basis: list[str] | None = None, device_ref: str | None = None,
                    research_only: bool | None = None) -> dict[str, Any]:
    """A validated RiskAssessment for a binary risk model.

    Args:
        prediction: the Prediction; its calibrated probability of the positive class is the risk.
        card: the model card (positive class, operating points).
        subject: ``Patient/<id>``; without one the subject is an unnamed display reference.
        basis: references (``Observation/…``) of the data the prediction used.
        device_ref: reference to the model's Device, when bundled with it.
    """
    p = _pred(prediction)
    pos = card.task.positive_class
    probs = p["calibrated"] or p["probabilities"]
    if pos is None or pos not in probs:
        raise ServingError("a RiskAssessment needs a binary model with a positive class",
                           model=card.name)
    risk = float(probs[pos])
    band = risk_band(risk, card, prediction)
    research = card.research_only if research_only is None else research_only
    ra: dict[str, Any] = {
        "resourceType": "RiskAssessment",
        "status": "final",
        "subject": {"reference": subject} if subject else {"display": "subject of the request"},
        "occurrenceDateTime": _now(),
        "method": {"coding": [{"system": f"{MEDDX_SYSTEM}/model", "code": card.name,
                               "version": card.version}],
                   "text": f"meddx {card.name} {card.version}"},
        "prediction": [{
            "outcome": {"coding": [{"system": f"{MEDDX_SYSTEM}/finding", "code": pos}],
                        "text": pos},
            "probabilityDecimal": round(risk, 6),
            "qualitativeRisk": {"coding": [{"system": RISK_PROBABILITY, "code": band}]},
        }],
    }
    if device_ref:
        ra["performer"] = {"reference": device_ref}
    if basis:
        ra["basis"] = [{"reference": b} for b in basis]
    notes = _notes(research)
    alert = decision_note(p)
    if alert:
        notes.append({"text": alert})
    if p.get("refer"):
        notes.append({"text": "conformal prediction set is not a single class: refer for review"})
    if notes:
        ra["note"] = notes
    validate(ra)
    return ra


# ------------------------------------------------------------------ validation
def _model(resource: dict[str, Any]) -> Any:
    from fhir.resources.R4B import get_fhir_model_class

    rtype = resource.get("resourceType")
    try:
        cls = get_fhir_model_class(str(rtype))
    except (KeyError, ValueError) as e:
        raise DataError(f"unknown FHIR R4 resource type {rtype!r}") from e
    return cls.model_validate(resource)


_MANY_REFERENCES = 16


def _plain_references(resource: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    """A RiskAssessment's ``basis`` lists every Observation used (~1,500 for a 48 h ICU stay).
    Building an R4B object for each costs ~30 ms per answer, so a long basis of plain
    references (``{"reference": "<non-empty string>"}``, the only content R4B checks there:
    a Reference with a FHIR string) is checked by that rule here, and R4B validates the
    resource with the first entry. Returns (what R4B should validate, indexes breaking the
    rule); anything else in the basis is left entirely to R4B."""
    basis = resource.get("basis") if resource.get("resourceType") == "RiskAssessment" else None
    if not isinstance(basis, list) or len(basis) < _MANY_REFERENCES:
        return resource, []
    if not all(isinstance(b, dict) and b.keys() == {"reference"} for b in basis):
        return resource, []
    bad = [i for i, b in enumerate(basis)
           if not isinstance(b["reference"], str) or not b["reference"]]
    return {**resource, "basis": basis[:1]}, bad


def validate(resource: dict[str, Any]) -> Any:
    """Validate with ``fhir.resources.R4B`` and our invariant checks; return the R4B model
    (of the resource as R4B checked it: a long plain ``basis`` with its first entry only).

    Raises:
        ServingError: a resource we built is invalid (a bug, never sent to a client).
    """
    checked, bad = _plain_references(resource)
    if bad:
        raise ServingError(f"built an invalid FHIR {resource.get('resourceType')}: "
                           f"basis[{bad[0]}] is not a Reference with a non-empty reference")
    try:
        model = _model(checked)
    except ValidationError as e:
        raise ServingError(f"built an invalid FHIR {resource.get('resourceType')}: {e}") from e
    problems = check_invariants(resource)
    if problems:
        raise ServingError("built FHIR that breaks R4 rules: " + "; ".join(problems))
    return model


def _codes(concept: dict[str, Any] | None, system: str) -> list[str]:
    return [c.get("code") for c in (concept or {}).get("coding", []) if c.get("system") == system]


def _check_one(r: dict[str, Any]) -> list[str]:
    rtype = r.get("resourceType", "?")
    out = []
    if rtype in _STATUS and r.get("status") not in _STATUS[rtype]:
        out.append(f"{rtype}.status {r.get('status')!r} is not in its required value set")
    for cat in r.get("category", []) if rtype == "Observation" else []:
        bad = [c for c in _codes(cat, OBS_CATEGORY) if c not in _OBS_CATEGORIES]
        if bad:
            out.append(f"Observation.category codes {bad} are not observation-category codes")
    if rtype == "Observation":
        q = r.get("valueQuantity")
        if q and q.get("code") == "1" and not 0.0 <= float(q.get("value", 0)) <= 1.0:
            out.append("Observation probability outside [0, 1]")
        if "dataAbsentReason" in r and any(k.startswith("value") for k in r):
            out.append("Observation has both a value and dataAbsentReason (obs-6)")
    if rtype == "Device":
        for dn in r.get("deviceName", []):
            if dn.get("type") not in _DEVICE_NAME_TYPES:
                out.append(f"Device.deviceName.type {dn.get('type')!r} not allowed")
    if rtype == "RiskAssessment":
        for pr in r.get("prediction", []):
            pd = pr.get("probabilityDecimal")
            if pd is not None and not 0.0 <= float(pd) <= 1.0:
                out.append("RiskAssessment probabilityDecimal outside [0, 1]")
            bad = [c for c in _codes(pr.get("qualitativeRisk"), RISK_PROBABILITY)
                   if c not in _QUALITATIVE]
            if bad:
                out.append(f"qualitativeRisk codes {bad} are not risk-probability codes")
    if rtype == "ServiceRequest" and r.get("intent") not in _INTENT:
        out.append(f"ServiceRequest.intent {r.get('intent')!r} is not a request-intent code")
    if rtype == "Media" and not (r.get("content") or {}).get("contentType"):
        out.append("Media.content.contentType is missing")
    return out


def _references(value: Any) -> list[str]:
    found: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "reference" and isinstance(v, str):
                found.append(v)
            else:
                found.extend(_references(v))
    elif isinstance(value, list):
        for v in value:
            found.extend(_references(v))
    return found


def check_invariants(resource: dict[str, Any]) -> list[str]:
    """What R4 forbids but the R4B models accept; an empty list when all is well."""
    problems = _check_one(resource)
    if resource.get("resourceType") != "Bundle":
        return problems
    if resource.get("type") not in _BUNDLE_TYPES:
        problems.append(f"Bundle.type {resource.get('type')!r} is not a bundle-type code")
    urls = [e.get("fullUrl") for e in resource.get("entry", [])]
    if len([u for u in urls if u]) != len({u for u in urls if u}):
        problems.append("Bundle entries repeat a fullUrl (bdl-7)")
    for e in resource.get("entry", []):
        res = e.get("resource") or {}
        problems += _check_one(res)
        for ref in _references(res):
            if ref.startswith("urn:uuid:") and ref not in urls:
                problems.append(f"{res.get('resourceType')} refers to {ref}, not in the Bundle")
    return problems


# ----------------------------------------------------------------------- input
def _decode_attachment(att: dict[str, Any], where: str) -> tuple[bytes, str | None]:
    if att.get("url") and not att.get("data"):
        raise DataError(f"{where} refers to its content by URL; meddx does not fetch it",
                        hint="send the attachment with its base64 `data`")
    if not att.get("data"):
        raise DataError(f"{where} has no data")
    try:
        raw = base64.b64decode(att["data"], validate=True)
    except (ValueError, TypeError) as e:
        raise DataError(f"{where}: data is not valid base64") from e
    if att.get("size") is not None and int(att["size"]) != len(raw):
        raise DataError(f"{where}: size says {att['size']} bytes, data has {len(raw)}")
    if att.get("hash"):
        digest = base64.b64encode(hashlib.sha1(raw).digest()).decode()
        if digest != att["hash"]:
            raise DataError(f"{where}: data does not match its SHA-1 hash")
    return raw, att.get("contentType")


def attachment_from_resource(resource: dict[str, Any]) -> tuple[bytes, str | None, str]:
    """The image inside a FHIR ``Binary``, ``Media`` or ``DocumentReference`` (R4).

    Returns:
        ``(bytes, content type, a name for the input)`` — the name is the resource type plus a
        suffix from the content type, never the resource id (which may identify a patient).

    Raises:
        DataError: not valid R4, no inline data, bad base64, size or hash mismatch.
        InputMismatchError: a resource type that carries no image.
    """
    rtype = resource.get("resourceType") if isinstance(resource, dict) else None
    if rtype not in ("Binary", "Media", "DocumentReference"):
        raise InputMismatchError(f"a {rtype or 'non-FHIR'} resource carries no image",
                                 hint="send a Binary, Media or DocumentReference")
    try:
        _model(resource)
    except ValidationError as e:
        raise DataError(f"the {rtype} is not valid FHIR R4: {e.errors()[0]['msg']}") from e
    if rtype == "Binary":
        raw, ctype = _decode_attachment(
            {"data": resource.get("data"), "contentType": resource.get("contentType")}, "Binary")
    elif rtype == "Media":
        raw, ctype = _decode_attachment(resource["content"], "Media.content")
    else:
        contents = resource.get("content") or []
        if not contents:
            raise DataError("DocumentReference has no content")
        raw, ctype = _decode_attachment(contents[0]["attachment"],
                                        "DocumentReference.content[0].attachment")
    suffix = {"image/png": ".png", "image/jpeg": ".jpg", "application/dicom": ".dcm",
              "application/octet-stream": ".bin"}.get((ctype or "").lower(), "")
    return raw, ctype, f"{rtype.lower()}{suffix}"
