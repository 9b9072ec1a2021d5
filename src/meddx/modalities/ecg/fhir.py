"""ECG in FHIR R4 (``fhir.resources.R4B`` only): waveforms as ``Observation.valueSampledData``
and rhythm interpretations as coded Observations.

A waveform Observation carries one ``component`` per lead (code: the MDC lead code where the
lead is a standard one, ``text``: the lead name), each with a ``valueSampledData``: ``origin``
(physical zero, with its unit), ``period`` (milliseconds between samples), ``factor``,
``dimensions`` = 1 and ``data`` (space-separated decimals; ``E``/``L``/``U`` mark invalid,
below-range and above-range samples). WFDB records are written with their ADC integers and
``factor = 1/gain``, ``origin = -baseline/gain``, so no precision is lost on the way.
"""

from __future__ import annotations

import logging
import uuid
from decimal import Decimal
from typing import Any

import numpy as np

from meddx.errors import DataError
from meddx.modalities.ecg.io import ECGRecord

__all__ = ["record_to_observation", "observation_to_record", "rhythm_observation",
           "is_observation", "is_waveform", "latest_waveform", "PREFETCH_QUERY"]

logger = logging.getLogger(__name__)

MDC = "urn:oid:2.16.840.1.113883.6.24"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
_CATEGORY = {
    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "procedure", "display": "Procedure"}]
}
# IEEE 11073-10101 lead codes; the electric potential of lead k is MDC 131328 + k
_LEAD_CODES = {"i": 1, "ii": 2, "v1": 3, "v2": 4, "v3": 5, "v4": 6, "v5": 7, "v6": 8,
               "iii": 61, "avr": 62, "avl": 63, "avf": 64}
_LEAD_NAMES = {"i": "I", "ii": "II", "iii": "III", "avr": "aVR", "avl": "aVL", "avf": "aVF"}
# rhythm classes we can code in SNOMED CT (by raw label or class name, lower case)
_RHYTHM_CODES = {
    "a": ("49436004", "Atrial fibrillation"),
    "af": ("49436004", "Atrial fibrillation"),
    "atrial fibrillation": ("49436004", "Atrial fibrillation"),
    "n": ("64730000", "Normal sinus rhythm"),
    "normal": ("64730000", "Normal sinus rhythm"),
}


def is_observation(source: Any) -> bool:
    """Whether ``source`` is a FHIR Observation as a dict."""
    return isinstance(source, dict) and source.get("resourceType") == "Observation"


# CDS Hooks prefetch template for the patient's latest ECG waveform
PREFETCH_QUERY = ("Observation?patient={{context.patientId}}"
                  "&code=urn:oid:2.16.840.1.113883.6.24|131328&_sort=-date&_count=1")


def is_waveform(resource: Any) -> bool:
    """Whether ``resource`` is an Observation carrying SampledData (an ECG waveform)."""
    if not is_observation(resource):
        return False
    return "valueSampledData" in resource or any(
        isinstance(c, dict) and "valueSampledData" in c for c in resource.get("component") or [])


def latest_waveform(resources_or_bundle: Any) -> dict[str, Any] | None:
    """The most recent waveform Observation in a Bundle (e.g. CDS Hooks prefetch), a list of
    resources, or a single Observation; None when there is none. Ordered by
    ``effectiveDateTime`` (else ``issued``); cancelled or entered-in-error ones are skipped."""
    items = resources_or_bundle
    if isinstance(items, dict) and items.get("resourceType") == "Bundle":
        items = [e.get("resource") for e in items.get("entry") or [] if isinstance(e, dict)]
    elif isinstance(items, dict):
        items = [items]
    found = [r for r in items or [] if is_waveform(r)
             and r.get("status") not in ("cancelled", "entered-in-error")]
    if not found:
        return None
    return max(found, key=lambda r: str(r.get("effectiveDateTime") or r.get("issued") or ""))


def _lead_code(name: str) -> dict[str, Any]:
    key = name.strip().lower()
    code: dict[str, Any] = {"text": name}
    if key in _LEAD_CODES:
        label = _LEAD_NAMES.get(key, key.upper())
        code["coding"] = [{"system": MDC, "code": str(131328 + _LEAD_CODES[key]),
                           "display": f"MDC_ECG_ELEC_POTL_{label.upper()}"}]
    return code


def _format(values: np.ndarray, integers: bool) -> str:
    out = []
    for v in values:
        if not np.isfinite(v):
            out.append("E")
        elif integers:
            out.append(str(int(v)))
        else:
            out.append(f"{float(v):.6g}")
    return " ".join(out)


def _sampled(record: ECGRecord, j: int) -> dict[str, Any]:
    unit = record.units[j] if j < len(record.units) else "mV"
    origin: dict[str, Any] = {"unit": unit, "system": UCUM, "code": unit}
    if record.digital is not None and record.gain is not None and record.baseline is not None:
        gain, base = float(record.gain[j]), int(record.baseline[j])
        data = np.where(np.isfinite(record.signal[:, j]), record.digital[:, j], np.nan)
        origin["value"] = -base / gain
        factor, text = 1.0 / gain, _format(data, integers=True)
    else:
        origin["value"] = 0.0
        factor, text = 1.0, _format(record.signal[:, j], integers=False)
    return {"origin": origin, "period": 1000.0 / record.fs, "factor": factor,
            "dimensions": 1, "data": text}


def record_to_observation(record: ECGRecord, *, subject: str | None = None,
                          effective: str | None = None, status: str = "final") -> dict[str, Any]:
    """An ECG record as a validated R4B Observation (one component per lead), as a dict.

    Args:
        record: the waveform.
        subject: a FHIR reference such as ``Patient/123`` (optional).
        effective: ISO date-time of the recording (optional).
        status: Observation status.
    """
    from fhir.resources.R4B.observation import Observation

    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": str(uuid.uuid4()),
        "status": status,
        "category": [_CATEGORY],
        "code": {"coding": [{"system": MDC, "code": "131328", "display": "MDC_ECG_ELEC_POTL"}],
                 "text": "ECG waveform"},
        "component": [{"code": _lead_code(name), "valueSampledData": _sampled(record, j)}
                      for j, name in enumerate(record.leads)],
    }
    if subject:
        resource["subject"] = {"reference": subject}
    if effective:
        resource["effectiveDateTime"] = effective
    return _validated(Observation, resource)


def _validated(cls: Any, resource: dict[str, Any]) -> dict[str, Any]:
    import json

    try:
        obj = cls.model_validate(resource)
    except ValueError as e:
        raise DataError(f"invalid FHIR {resource.get('resourceType')}: {e}") from e
    return json.loads(obj.model_dump_json(exclude_none=True))


def _lead_name(code: Any, index: int) -> str:
    if code is None:
        return f"lead{index + 1}"
    if code.text:
        return str(code.text)
    for c in code.coding or []:
        if c.display:
            return str(c.display).removeprefix("MDC_ECG_ELEC_POTL_")
        if c.code:
            return str(c.code)
    return f"lead{index + 1}"


def _decode(sd: Any, name: str, record_id: str) -> tuple[list[np.ndarray], float, str]:
    """One SampledData → ``dimensions`` lead arrays in physical units, the rate, the unit."""
    dims = int(sd.dimensions)
    tokens = (sd.data or "").split()
    if not tokens:
        raise DataError(f"SampledData of lead {name} holds no data", sample_id=record_id)
    if len(tokens) % dims:
        raise DataError(
            f"SampledData of lead {name}: dimensions={dims} disagrees with the data "
            f"({len(tokens)} values is not a multiple of {dims})",
            sample_id=record_id, hint="dimensions is the number of interleaved channels")
    try:
        raw = np.array([np.nan if t in ("E", "L", "U") else float(t) for t in tokens])
    except ValueError as e:
        raise DataError(f"SampledData of lead {name} holds a value that is not a decimal",
                        sample_id=record_id) from e
    period = float(sd.period)
    if period <= 0:
        raise DataError(f"SampledData of lead {name} has period {period} ms; the sampling "
                        "rate is absent", sample_id=record_id)
    origin = float(sd.origin.value) if sd.origin.value is not None else 0.0
    factor = float(sd.factor) if sd.factor is not None else 1.0
    values = origin + factor * raw
    unit = sd.origin.code or sd.origin.unit or "mV"
    return [values[k::dims] for k in range(dims)], round(1000.0 / period, 6), str(unit)


def observation_to_record(resource: dict[str, Any], record_id: str | None = None) -> ECGRecord:
    """Read an ECG waveform Observation (R4B) back into an :class:`ECGRecord`.

    Leads come from ``component[].valueSampledData`` (named by ``component.code.text`` or its
    MDC display) or from a top-level ``valueSampledData`` (``dimensions`` interleaved leads).

    Raises:
        DataError: not a valid Observation, no SampledData, a sampling period absent, leads at
            different rates or lengths, or ``dimensions`` that disagree with the data.
    """
    from fhir.resources.R4B.observation import Observation

    rid = record_id or str(resource.get("id") or "observation")
    components = resource.get("component")
    for comp in components if isinstance(components, list) else []:  # else: validation says
        sd = comp.get("valueSampledData") if isinstance(comp, dict) else None
        if isinstance(sd, dict) and sd.get("period") in (None, ""):
            raise DataError("SampledData has no period: the sampling rate is absent",
                            sample_id=rid, hint="period is the time between samples in ms")
    try:
        obs = Observation.model_validate(resource)
    except ValueError as e:
        raise DataError(f"not a valid FHIR R4 Observation: {e}", sample_id=rid) from e
    parts: list[tuple[Any, str]] = []
    if obs.valueSampledData is not None:
        parts.append((obs.valueSampledData, _lead_name(obs.code, 0)))
    for i, comp in enumerate(obs.component or []):
        if comp.valueSampledData is not None:
            parts.append((comp.valueSampledData, _lead_name(comp.code, i)))
    if not parts:
        raise DataError("Observation carries no valueSampledData", sample_id=rid,
                        hint="an ECG goes in component[].valueSampledData, one per lead")
    leads, names, rates, units = [], [], set(), []
    for sd, name in parts:
        arrays, fs, unit = _decode(sd, name, rid)
        rates.add(fs)
        for k, a in enumerate(arrays):
            leads.append(a)
            names.append(name if len(arrays) == 1 else f"{name}{k + 1}")
            units.append(unit)
    if len(rates) != 1:
        raise DataError(f"leads are sampled at different rates {sorted(rates)}", sample_id=rid)
    if len({len(a) for a in leads}) != 1:
        raise DataError("leads hold different numbers of samples", sample_id=rid)
    return ECGRecord(id=rid, signal=np.stack(leads, axis=1), fs=rates.pop(), leads=names,
                     units=units)


def _rhythm_value(label: str, task: Any) -> dict[str, Any]:
    keys = [label.lower()]
    if task.label_values is not None and label in task.class_names:
        keys.insert(0, str(task.label_values[task.class_names.index(label)]).lower())
    for key in keys:
        if key in _RHYTHM_CODES:
            code, display = _RHYTHM_CODES[key]
            return {"coding": [{"system": SNOMED, "code": code, "display": display}],
                    "text": label}
    return {"text": label}


def rhythm_observation(prediction: Any, card: Any, *, subject: str | None = None,
                       derived_from: str | None = None) -> dict[str, Any]:
    """A prediction as an R4B Observation "Heart rate rhythm" (LOINC 8884-9), as a dict.

    The value is the most probable rhythm (SNOMED CT coded for normal sinus rhythm and atrial
    fibrillation); one component per class carries its (calibrated, where fitted) probability.
    """
    from fhir.resources.R4B.observation import Observation

    probs = prediction.calibrated or prediction.probabilities
    label = str(prediction.label)
    components = [
        {"code": {"text": f"probability of {name}"},
         "valueQuantity": {"value": Decimal(f"{float(p):.6f}"), "unit": "1", "system": UCUM,
                           "code": "1"}}
        for name, p in probs.items()
    ]
    notes = [f"Predicted by {card.name} {card.version} "
             f"(sha256 {prediction.model.get('sha256', 'unknown')[:12]})."]
    if card.research_only:
        notes.append("Research use only — not for diagnosis.")
    if prediction.refer:
        notes.append("Conformal set holds more than one rhythm: refer to a clinician.")
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": str(uuid.uuid4()),
        "status": "preliminary",
        "category": [_CATEGORY],
        "code": {"coding": [{"system": LOINC, "code": "8884-9", "display": "Heart rate rhythm"}],
                 "text": "ECG rhythm interpretation"},
        "valueCodeableConcept": _rhythm_value(label, card.task),
        "method": {"text": f"deep learning model {card.name} ({card.network.get('name')})"},
        "component": components,
        "note": [{"text": t} for t in notes],
    }
    if subject:
        resource["subject"] = {"reference": subject}
    if derived_from:
        resource["derivedFrom"] = [{"reference": derived_from}]
    return _validated(Observation, resource)
