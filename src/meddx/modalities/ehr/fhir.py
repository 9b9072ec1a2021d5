"""FHIR R4B for ICU stays: PhysioNet stay → Bundle, Bundle/CDS prefetch → stay, RiskAssessment.

Writing (:func:`physionet_to_bundle`) builds plain dicts that validate with
``fhir.resources.R4B`` (checked in the tests). Reading (:func:`stay_from_fhir`) is a fast path:
plain JSON, touching only the fields the model reads (Patient.gender/birthDate, the Encounter's
period.start and type, each Observation's code, value, unit, time and status), so that a CDS
Hooks call with 1,500 Observations costs milliseconds rather than building model objects.

PhysioNet records carry no dates: exported stays are placed at a fixed synthetic ICU admission
(:data:`SYNTHETIC_ADMISSION`); only times relative to the Encounter's start matter.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from meddx.errors import DataError
from meddx.fhir.resources import decision_note
from meddx.modalities.ehr.io import (
    ICU_TYPES,
    Issue,
    OnMalformed,
    Stay,
    Variable,
    read_physionet_stay,
    variables,
)
from meddx.sideinputs import age_in_years

__all__ = [
    "SYNTHETIC_ADMISSION",
    "ICU_TYPE_SYSTEM",
    "RECORD_SYSTEM",
    "physionet_to_bundle",
    "stay_to_bundle",
    "stay_from_fhir",
    "convert_unit",
    "risk_band",
    "risk_assessment",
]

logger = logging.getLogger(__name__)

SYNTHETIC_ADMISSION = datetime(2012, 1, 1, tzinfo=UTC)
UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"
ICU_TYPE_SYSTEM = "https://meddx.dev/fhir/CodeSystem/physionet2012-icu-type"
RECORD_SYSTEM = "https://physionet.org/content/challenge-2012/RecordID"
_NS = uuid.UUID("6b1f3f0e-0c3e-4d8e-9a52-5d0f2c9b2012")
_OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"


# --------------------------------------------------------------------------- writing
def _uid(*parts: object) -> str:
    return str(uuid.uuid5(_NS, "/".join(str(p) for p in parts)))


def _quantity(var: Variable, value: float) -> dict[str, Any]:
    return {"value": value, "unit": var.ucum, "system": UCUM, "code": var.ucum}


def _observation(var: Variable, value: float, when: datetime, oid: str, pid: str,
                 eid: str) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": var.system, "code": var.code, "display": var.display}],
                 "text": var.parameter},
        "subject": {"reference": f"urn:uuid:{pid}"},
        "encounter": {"reference": f"urn:uuid:{eid}"},
        "effectiveDateTime": when.isoformat(),
        "valueQuantity": _quantity(var, value),
    }
    if var.category in ("vital-signs", "laboratory", "survey", "procedure"):
        obs["category"] = [{"coding": [{"system": _OBS_CATEGORY, "code": var.category}]}]
    return obs


def stay_to_bundle(stay: Stay, admission: datetime = SYNTHETIC_ADMISSION) -> dict[str, Any]:
    """A :class:`Stay` → FHIR R4B ``collection`` Bundle (Patient, ICU Encounter, Observations)."""
    rid = stay.record_id
    pid, eid = _uid(rid, "patient"), _uid(rid, "encounter")
    table = variables()
    patient: dict[str, Any] = {
        "resourceType": "Patient", "id": pid,
        "identifier": [{"system": RECORD_SYSTEM, "value": rid}],
        "gender": stay.sex or "unknown",
    }
    if stay.age is not None:
        patient["birthDate"] = f"{admission.year - int(stay.age):04d}"
    encounter: dict[str, Any] = {
        "resourceType": "Encounter", "id": eid, "status": "in-progress",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP",
                  "display": "inpatient encounter"},
        "subject": {"reference": f"urn:uuid:{pid}"},
        "period": {"start": admission.isoformat()},
    }
    if stay.icu_type is not None:
        label = ICU_TYPES[stay.icu_type]
        encounter["type"] = [{"coding": [{"system": ICU_TYPE_SYSTEM, "code": str(stay.icu_type),
                                          "display": label}], "text": label}]
    resources = [patient, encounter]
    statics = [("Age", stay.age), ("Height", stay.height)]
    for name, value in statics:
        if value is not None:
            resources.append(_observation(table[name], value, admission, _uid(rid, name), pid, eid))
    for n, (minutes, name, value) in enumerate(stay.events):
        when = admission + timedelta(minutes=minutes)
        resources.append(_observation(table[name], value, when, _uid(rid, "obs", n), pid, eid))
    return {
        "resourceType": "Bundle", "id": _uid(rid, "bundle"), "type": "collection",
        "timestamp": admission.isoformat(),
        "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources],
    }


def physionet_to_bundle(path: str | Path, on_malformed: OnMalformed = "warn",
                        admission: datetime = SYNTHETIC_ADMISSION) -> dict[str, Any]:
    """Convert a PhysioNet 2012 stay file into a FHIR R4B Bundle (a dict).

    The Encounter's ``period.start`` is the ICU admission; each measurement becomes an
    Observation (LOINC code, UCUM unit) at admission + its time. Lines that cannot be used are
    left out and logged with file and line (or raise with ``on_malformed="error"``).
    """
    stay = read_physionet_stay(path, on_malformed)
    for issue in stay.issues:
        logger.warning("left out of the Bundle: %s", issue)
    return stay_to_bundle(stay, admission)


# --------------------------------------------------------------------------- units
_ALIASES = {
    "mmhg": "mm[Hg]", "mm hg": "mm[Hg]", "beats/min": "/min", "{beats}/min": "/min",
    "bpm": "/min", "1/min": "/min", "{breaths}/min": "/min", "breaths/min": "/min",
    "min-1": "/min", "degc": "Cel", "°c": "Cel", "c": "Cel", "cel": "Cel", "[degf]": "[degF]",
    "degf": "[degF]", "°f": "[degF]", "mg/dl": "mg/dL", "g/dl": "g/dL", "g/l": "g/L",
    "mmol/l": "mmol/L", "meq/l": "mmol/L", "u/l": "U/L", "iu/l": "U/L", "[iu]/l": "U/L",
    "10*3/ul": "10*3/uL", "10^3/ul": "10*3/uL", "10*9/l": "10*3/uL", "10^9/l": "10*3/uL",
    "k/ul": "10*3/uL", "/nl": "10*3/uL", "ml": "mL", "l": "L", "a": "a", "yr": "a",
    "years": "a", "mo": "mo", "{fraction}": "1", "%": "%", "ug/l": "ng/mL", "ng/ml": "ng/mL",
    "ng/l": "ng/L", "pg/ml": "ng/L", "umol/l": "umol/L", "µmol/l": "umol/L", "kg": "kg",
    "g": "g", "[lb_av]": "[lb_av]", "lb": "[lb_av]", "cm": "cm", "m": "m", "[in_i]": "[in_i]",
    "in": "[in_i]", "kpa": "kPa", "[ph]": "[pH]", "ph": "[pH]", "{score}": "{score}",
    "score": "{score}", "1": "1",
}
_UNITLESS = {"[pH]", "{score}", "1"}
_GENERIC: dict[tuple[str, str], Callable[[float], float]] = {
    ("Cel", "[degF]"): lambda v: (v - 32.0) * 5.0 / 9.0,
    ("kg", "g"): lambda v: v / 1000.0,
    ("kg", "[lb_av]"): lambda v: v * 0.45359237,
    ("cm", "m"): lambda v: v * 100.0,
    ("cm", "[in_i]"): lambda v: v * 2.54,
    ("mL", "L"): lambda v: v * 1000.0,
    ("1", "%"): lambda v: v / 100.0,
    ("%", "1"): lambda v: v * 100.0,
    ("g/dL", "g/L"): lambda v: v / 10.0,
    ("ng/mL", "ng/L"): lambda v: v / 1000.0,
    ("mm[Hg]", "kPa"): lambda v: v * 7.500617,
    ("a", "mo"): lambda v: v / 12.0,
}
_MOLAR: dict[tuple[str, str], Callable[[float], float]] = {
    ("Glucose", "mmol/L"): lambda v: v * 18.016,
    ("BUN", "mmol/L"): lambda v: v * 2.801,
    ("Creatinine", "umol/L"): lambda v: v / 88.42,
    ("Bilirubin", "umol/L"): lambda v: v / 17.1,
    ("Mg", "mmol/L"): lambda v: v * 2.431,
    ("Cholesterol", "mmol/L"): lambda v: v * 38.67,
    ("Lactate", "mg/dL"): lambda v: v / 9.008,
}


def convert_unit(var: Variable, value: float, unit: str | None) -> float | None:
    """``value`` in ``unit`` → the variable's PhysioNet unit; None when it does not convert.

    The canonical unit passes unchanged (no arithmetic), so a round trip is exact.
    """
    target = var.ucum
    if unit == target:
        return value
    if unit is None or not unit.strip():
        return value if target in _UNITLESS else None
    u = _ALIASES.get(unit.strip().lower(), unit.strip())
    if u == target:
        return value
    fn = _MOLAR.get((var.parameter, u)) or _GENERIC.get((target, u))
    return fn(value) if fn else None


# --------------------------------------------------------------------------- reading
def _load(source: Any) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    text: str
    if isinstance(source, bytes):
        text = source.decode("utf-8", errors="replace")
    elif isinstance(source, str) and source.lstrip().startswith("{"):
        text = source
    else:
        p = Path(source)
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read FHIR JSON: {e}", path=str(p)) from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON: {e}", hint="give a FHIR Bundle or a CDS prefetch") from e
    except RecursionError as e:
        raise DataError("the JSON is nested too deeply to be a FHIR resource") from e
    if not isinstance(data, dict):
        raise DataError("FHIR input must be a JSON object (a Bundle or a CDS prefetch)")
    return data


def _entries(obj: Any) -> list[tuple[str | None, dict[str, Any]]]:
    """(fullUrl, resource) pairs from a resource, a Bundle, or None."""
    if obj is None:
        return []
    if not isinstance(obj, Mapping):
        raise DataError("a prefetch value must be a FHIR resource or Bundle (a JSON object)")
    if obj.get("resourceType") == "Bundle":
        out = []
        for e in _list(obj.get("entry")):
            r = e.get("resource") if isinstance(e, Mapping) else None
            if isinstance(r, Mapping):
                out.append((e.get("fullUrl"), r))
        return out
    return [(None, obj)]  # type: ignore[list-item]


def _obj(value: Any) -> Mapping[str, Any]:
    """``value`` when it is a JSON object, else an empty one (a field of the wrong type reads
    as absent, and the reader then says which field is missing)."""
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str) or "T" not in text:
        return None  # a date without a time of day cannot be placed in hourly bins
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _code_index() -> dict[tuple[str, str], Variable]:
    return {(v.system, v.code): v for v in variables().values() if v.code}


def _pick_encounter(encounters: list[tuple[str | None, dict[str, Any]]]
                    ) -> tuple[str | None, dict[str, Any]]:
    if not encounters:
        raise DataError(
            "the FHIR input has no Encounter",
            hint="the ICU admission time (Encounter.period.start) defines the 48 h window; "
            "send the in-progress ICU Encounter",
        )
    active = [e for e in encounters if e[1].get("status") == "in-progress"] or encounters
    active.sort(key=lambda e: str(_obj(e[1].get("period")).get("start", "")))
    return active[-1]


def _age_from_birthdate(birth: Any, start: datetime) -> float | None:
    """Age at the stay's start by the project's one rule (:func:`meddx.sideinputs.age_in_years`);
    an unreadable birth date is a missing age (the stay's other data still count)."""
    if not isinstance(birth, str) or not birth:
        return None
    try:
        return float(age_in_years(birth, start.date()))
    except DataError:
        return None


def _value(obs: Mapping[str, Any]) -> tuple[float | None, str | None]:
    if "valueQuantity" in obs:
        q = _obj(obs["valueQuantity"])
        v = q.get("value")
        unit = q.get("code") if q.get("system") == UCUM and q.get("code") else q.get("unit")
        if unit is not None and not isinstance(unit, str):
            unit = json.dumps(unit, default=str)[:40]  # reported: a unit that does not convert
        return (float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None), unit
    if "valueInteger" in obs and isinstance(obs["valueInteger"], int):
        return float(obs["valueInteger"]), None
    if "valueBoolean" in obs and isinstance(obs["valueBoolean"], bool):
        return (1.0 if obs["valueBoolean"] else 0.0), None
    return None, None


def _effective(obs: Mapping[str, Any]) -> datetime | None:
    for key in ("effectiveDateTime", "effectiveInstant"):
        if key in obs:
            return _parse_time(obs[key])
    if "effectivePeriod" in obs:
        return _parse_time(_obj(obs["effectivePeriod"]).get("start"))
    return None


def _read_observation(stay: Stay, ref: str, obs: Mapping[str, Any], start: datetime,
                      index: Mapping[tuple[str, str], Variable],
                      on_malformed: OnMalformed) -> None:
    codings = _list(_obj(obs.get("code")).get("coding"))
    var = None
    for c in codings:
        key = (_obj(c).get("system", ""), _obj(c).get("code", ""))
        if isinstance(key[0], str) and isinstance(key[1], str):
            var = index.get(key)
            if var is not None:
                break

    def skip(reason: str, code: str, malformed: bool = True) -> None:
        shown = ", ".join(f"{c.get('system', '')}|{c.get('code', '')}" for c in codings
                          if isinstance(c, Mapping)) or "no coding"
        issue = Issue(ref, None, reason, shown, code)
        if malformed and on_malformed == "error":
            raise DataError(f"malformed Observation: {issue}", sample_id=stay.record_id)
        stay.issues.append(issue)

    if var is None or var.role not in ("series", "static"):
        return skip("unknown code (not used by the model)", "unknown_code", malformed=False)
    if obs.get("status") in ("entered-in-error", "cancelled", "registered"):
        return skip(f"status '{obs.get('status')}'", "unusable_status", malformed=False)
    value, unit = _value(obs)
    if value is None:
        return skip("no numeric value", "no_numeric_value")
    converted = convert_unit(var, value, unit)
    if converted is None:
        return skip(f"unit '{unit}' does not convert to '{var.ucum}'", "unit_not_convertible")
    if not var.plausible(converted):
        return skip(f"implausible {var.parameter} {converted:g} "
                    f"(accepted {var.plausible_min:g}-{var.plausible_max:g})",
                    "implausible_value")
    when = _effective(obs)
    if when is None:
        return skip("no effective date and time", "no_time")
    if var.parameter == "Age":
        stay.age = converted
    elif var.parameter == "Height":
        stay.height = converted
    else:
        stay.events.append(((when - start).total_seconds() / 60.0, var.parameter, converted))
        stay.basis.append(ref)


def _split_source(data: dict[str, Any]) -> tuple[list, list, list, Any]:
    """Patients, Encounters, other (fullUrl, resource) pairs and the stated prediction time."""
    if data.get("resourceType") == "Bundle":
        pairs = _entries(data)
        now = None
    elif data.get("resourceType"):
        raise DataError(f"expected a Bundle or a CDS prefetch, got a {data['resourceType']}",
                        hint="wrap the resources in a Bundle")
    else:  # CDS Hooks prefetch: {"patient": …, "encounter": …, "observations": Bundle}
        pairs = []
        for key in ("patient", "encounter", "observations"):
            pairs.extend(_entries(data.get(key)))
        now = data.get("prediction_time")
    patients = [(u, r) for u, r in pairs if r.get("resourceType") == "Patient"]
    encounters = [(u, r) for u, r in pairs if r.get("resourceType") == "Encounter"]
    return patients, encounters, pairs, now


def _reference(full_url: str | None, res: Mapping[str, Any]) -> str | None:
    if full_url:
        return full_url
    return f"{res['resourceType']}/{res['id']}" if res.get("id") else None


def stay_from_fhir(source: Any, on_malformed: OnMalformed = "warn") -> Stay:
    """Read a FHIR Bundle or a CDS Hooks prefetch into a :class:`Stay` (fast JSON path).

    Args:
        source: a Bundle (dict, JSON text or ``.json`` path) holding a Patient, the ICU
            Encounter and Observations; or a prefetch dict ``{"patient": Patient,
            "encounter": Encounter or Bundle, "observations": Bundle}`` with an optional
            ``"prediction_time"`` (ISO dateTime; default: the last observation).
        on_malformed: ``"error"`` raises on an Observation with no value, a unit that does not
            convert or an implausible value; ``"warn"`` leaves it out and lists it.
            Unknown codes and times outside the window are always left out and listed.

    Raises:
        DataError: no Patient, several Patients, no Encounter or no admission time.
    """
    data = _load(source)
    patients, encounters, pairs, now = _split_source(data)
    if not patients:
        raise DataError("the FHIR input has no Patient",
                        hint="include the Patient resource (Bundle entry or prefetch 'patient')")
    if len({json.dumps(p.get("id"), default=str) for _, p in patients}) > 1:
        raise DataError("the FHIR input holds several Patients; send one patient's data")
    (patient_url, patient), (encounter_url, encounter) = patients[0], _pick_encounter(encounters)
    start = _parse_time(_obj(encounter.get("period")).get("start"))
    if start is None:
        raise DataError("the Encounter has no period.start (ICU admission date and time)",
                        hint="the 48 h window is counted from the ICU admission")
    stay = Stay(record_id=str(encounter.get("id") or "encounter"),
                patient_ref=_reference(patient_url, patient),
                encounter_ref=_reference(encounter_url, encounter))
    stay.sex = patient.get("gender") if patient.get("gender") in ("male", "female") else None
    for t in _list(encounter.get("type")):
        for c in map(_obj, _list(_obj(t).get("coding"))):
            if c.get("system") == ICU_TYPE_SYSTEM and str(c.get("code")) in ("1", "2", "3", "4"):
                stay.icu_type = int(c["code"])
    if now is not None:
        when = _parse_time(now)
        if when is None:
            raise DataError(f"prediction_time {now!r} is not an ISO date and time")
        stay.prediction_minutes = (when - start).total_seconds() / 60.0
    index, others = _code_index(), Counter()
    for n, (full_url, res) in enumerate(pairs):
        kind = res.get("resourceType")
        if kind == "Observation":
            ref = full_url or (f"Observation/{res['id']}" if res.get("id") else f"entry[{n}]")
            _read_observation(stay, ref, res, start, index, on_malformed)
        elif kind not in ("Patient", "Encounter"):
            others[str(kind)] += 1
    if stay.age is None:
        stay.age = _age_from_birthdate(patient.get("birthDate"), start)
    for kind, count in others.items():
        stay.issues.append(Issue("input", None, f"{count} {kind} resource(s) not used",
                                 code="unused_resource", count=count))
    return stay


# --------------------------------------------------------------------------- writing results
def risk_band(risk: float, card: Any) -> tuple[str, float, float]:
    """Qualitative band (``low``/``moderate``/``high``) and its cut-offs for a risk.

    The cut-offs come from the card: the threshold of its sensitivity operating point marks
    the top of ``low`` and that of its specificity operating point the start of ``high``;
    without them, ``preprocessing["risk_bands"]`` (defaults 10% and 30%).
    """
    ops = getattr(card, "operating_points", {}) or {}
    by_method = {getattr(op, "method", None): float(op.threshold) for op in ops.values()}
    bands = (getattr(card, "preprocessing", {}) or {}).get("risk_bands", {})
    low = by_method.get("sensitivity", float(bands.get("low_below", 0.10)))
    high = by_method.get("specificity", float(bands.get("high_from", 0.30)))
    low, high = min(low, high), max(low, high)
    band = "low" if risk < low else "high" if risk >= high else "moderate"
    return band, low, high


def _ref(value: Any) -> dict[str, Any] | None:
    if not value:
        return None
    return {"reference": value} if isinstance(value, str) else dict(value)


def risk_assessment(prediction: Any, card: Any) -> dict[str, Any]:
    """A FHIR R4B RiskAssessment (dict) for an ICU mortality prediction.

    Uses the calibrated risk of the card's positive class, its band
    (``qualitativeRisk`` from the card's thresholds), the hours of data used and the
    Observations used (``basis``) from ``prediction.notes``.
    """
    pos = card.task.positive_class
    probs = prediction.calibrated or prediction.probabilities
    risk = float(probs[pos])
    band, low, high = risk_band(risk, card)
    notes = prediction.notes or {}
    hours = notes.get("hours_used")
    data = f"from {hours} h of ICU data" if hours is not None else "from the data given"
    text = (f"Risk of {pos} estimated by {card.name} {card.version} {data}; "
            f"bands: low < {low:.0%} ≤ moderate < {high:.0%} ≤ high.")
    if card.research_only:
        text += " Research use only — not for diagnosis."
    ra: dict[str, Any] = {
        "resourceType": "RiskAssessment",
        "status": "final",
        "method": {"text": f"meddx {card.name} {card.version} ({card.network.get('name')})"},
        "code": {"text": "In-hospital mortality risk from the first 48 h of an ICU stay"
                 if card.modality == "ehr" else f"Risk of {pos}"},
        "subject": _ref(notes.get("patient")) or {"display": "patient of the assessed stay"},
        "occurrenceDateTime": datetime.now(UTC).isoformat(timespec="seconds"),
        "prediction": [{
            "outcome": {"text": "in-hospital death" if pos in ("died", "death") else str(pos)},
            "probabilityDecimal": round(risk, 4),
            "qualitativeRisk": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/risk-probability",
                "code": band, "display": f"{band.capitalize()} likelihood"}]},
            "rationale": f"{hours} h of data after ICU admission" if hours is not None else None,
        }],
        "note": [{"text": text}],
    }
    alert = decision_note(prediction)
    if alert:  # at the operating point of this deployment (`--operating-point`)
        ra["note"].append({"text": alert})
    if ra["prediction"][0]["rationale"] is None:
        del ra["prediction"][0]["rationale"]
    if notes.get("encounter"):
        ra["encounter"] = _ref(notes["encounter"])
    basis = [b for b in notes.get("basis") or [] if b]
    if basis:
        ra["basis"] = [{"reference": b} for b in dict.fromkeys(basis)]
    findings = notes.get("findings")
    explanation = getattr(prediction, "explanation", None)
    if not findings and isinstance(explanation, tuple) and explanation and \
            isinstance(explanation[0], list):
        findings = explanation[0]  # (findings, attributions) from the EHR explainer
    if findings:
        ra["note"].append({"text": "Top contributing findings: " + "; ".join(findings)})
    return ra
