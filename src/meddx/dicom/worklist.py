"""Worklist priority: which studies a reader should open first.

:func:`rank` turns the analyses of each study into one :class:`WorklistEntry`: the study's risk
(the highest calibrated risk any model gave on any of its series or images), its priority and
the reasons for it:

* ``stat`` — a model's decision is positive with a calibrated risk ≥ ``stat_risk``;
* ``urgent`` — a decision is positive, or a series is out of distribution (the model made no
  decision: a human must look);
* ``routine`` — otherwise.

Entries sort stat → urgent → routine, then by risk (highest first). They name the study by a
salted hash (the same key the receiving pipeline logs); the Study Instance UID is kept only for
the operator's table, the JSON and FHIR when the caller asks for it. The worklist persists in a
``worklist`` table of the work folder's SQLite file (:func:`save_worklist`), from which
:func:`worklist_json` answers, and :func:`to_fhir` gives an R4B ``Task`` (priority
stat/urgent/routine, focus = the ImagingStudy by its Study Instance UID identifier).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import sqlite3
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from meddx.dicom.model import SeriesAnalysis
from meddx.errors import ConfigError
from meddx.inference.prediction import Prediction

__all__ = ["WorklistEntry", "rank", "study_key", "save_worklist", "load_worklist",
           "worklist_json", "worklist_rows", "TABLE_HEADER", "to_fhir", "to_fhir_bundle",
           "PRIORITIES"]

Priority = Literal["stat", "urgent", "routine"]
PRIORITIES: tuple[str, ...] = ("stat", "urgent", "routine")
TABLE_HEADER = ("priority", "risk", "study", "reasons", "models", "updated")
STUDY_UID_SYSTEM = "urn:dicom:uid"
STUDY_KEY_SYSTEM = "urn:meddx:study-key"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS worklist (
    study_key TEXT PRIMARY KEY,
    study_uid TEXT,
    entry TEXT NOT NULL
)
"""


def study_key(study_uid: str, salt: str) -> str:
    """The salted hash that names a study (in logs, the audit and the worklist)."""
    if not salt:
        raise ConfigError("a study key needs a secret salt", hint="use the work folder's salt")
    return hashlib.sha256(f"{salt}\x00{study_uid}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class WorklistEntry:
    """One study on the worklist.

    Attributes:
        study_key: salted hash of the Study Instance UID.
        risk: the highest calibrated risk of any model on the study (None: no model gave one).
        priority: ``stat`` | ``urgent`` | ``routine``.
        reasons: why, one line per finding that counts (model, decision, operating point).
        models: ``name version`` of every model that analysed the study.
        updated: when the entry was last computed (UTC).
        study_uid: the Study Instance UID, only where the caller asked for it.
    """

    study_key: str
    risk: float | None
    priority: str
    reasons: tuple[str, ...]
    models: tuple[str, ...]
    updated: dt.datetime
    study_uid: str | None = None

    def __post_init__(self) -> None:
        if self.priority not in PRIORITIES:
            raise ConfigError(f"unknown priority {self.priority!r}",
                              hint=f"one of {', '.join(PRIORITIES)}")

    def sort_key(self) -> tuple[int, float, float]:
        return (PRIORITIES.index(self.priority), -(self.risk if self.risk is not None else -1.0),
                -self.updated.timestamp())

    def to_dict(self, include_uid: bool = False) -> dict[str, Any]:
        """JSON-safe; the Study Instance UID only with ``include_uid``."""
        out = asdict(self)
        out["reasons"], out["models"] = list(self.reasons), list(self.models)
        out["updated"] = self.updated.isoformat()
        out["risk"] = None if self.risk is None else round(self.risk, 6)
        if not include_uid:
            out.pop("study_uid")
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> WorklistEntry:
        return cls(study_key=raw["study_key"], risk=raw["risk"], priority=raw["priority"],
                   reasons=tuple(raw["reasons"]), models=tuple(raw["models"]),
                   updated=dt.datetime.fromisoformat(raw["updated"]),
                   study_uid=raw.get("study_uid"))


def _risk(pred: Prediction) -> float | None:
    if pred.risk is not None:
        return float(pred.risk)
    if isinstance(pred.decision, dict):  # multilabel: the most probable label decided present
        probs = pred.calibrated or pred.probabilities
        vals = [probs[k] for k, on in pred.decision.items() if on and k in probs]
        return float(max(vals)) if vals else float(max(probs.values()))
    return None


def _positive(pred: Prediction) -> bool:
    if isinstance(pred.decision, dict):
        return any(pred.decision.values())
    positive = pred.model.get("positive_class")
    return bool(positive) and pred.decision == positive


def _findings(analysis: SeriesAnalysis) -> tuple[list[str], float | None, bool, bool]:
    """Reasons, the highest risk, whether any decision is positive, whether OOD."""
    model = f"{analysis.algorithm.name} {analysis.algorithm.version}"
    preds = [analysis.prediction, *(p for _, p in analysis.per_image)]
    risks = [r for r in (_risk(p) for p in preds) if r is not None]
    risk = max(risks) if risks else None
    pred = analysis.prediction
    positive = any(_positive(p) for p in preds)
    ood = any(bool(p.ood) for p in preds)
    reasons = []
    if positive:
        op = pred.operating_point or next((p.operating_point for p in preds
                                           if p.operating_point), "its operating point")
        decided = pred.model.get("positive_class") or "a label"
        reasons.append(f"{model}: {decided} at {op}"
                       + (f" (risk {risk:.2f})" if risk is not None else ""))
    if ood:
        reasons.append(f"{model}: out of distribution, no decision")
    if any(p.refer for p in preds):
        sets = sorted({", ".join(p.prediction_set or ()) for p in preds if p.refer})
        reasons.append(f"{model}: conformal set {{{'; '.join(sets)}}}: refer to a reader")
    if any(p.review for p in preds):
        reasons.append(f"{model}: decision and conformal set disagree: review")
    return reasons, risk, positive, ood


def rank(analyses: Iterable[SeriesAnalysis], *, salt: str, stat_risk: float | None = 0.9,
         include_uid: bool = False, now: dt.datetime | None = None) -> list[WorklistEntry]:
    """One entry per study, most urgent first.

    Args:
        analyses: every analysis of the studies to rank (several series, several models).
        salt: the secret for the study keys.
        stat_risk: a positive decision at or above this calibrated risk is ``stat``
            (None: never stat).
        include_uid: keep each study's Study Instance UID in its entry.
        now: the ``updated`` time (default: now, UTC).
    """
    if stat_risk is not None and not 0.0 <= stat_risk <= 1.0:
        raise ConfigError(f"stat_risk must be in [0, 1], got {stat_risk}")
    now = now or dt.datetime.now(dt.UTC)
    studies: dict[str, list[SeriesAnalysis]] = {}
    for a in analyses:
        studies.setdefault(a.study_uid, []).append(a)
    entries = []
    for uid, items in studies.items():
        reasons: list[str] = []
        risks, positive, ood = [], False, False
        for a in items:
            r, risk, pos, out = _findings(a)
            reasons += r
            positive, ood = positive or pos, ood or out
            if risk is not None:
                risks.append(risk)
        risk = max(risks) if risks else None
        if positive and stat_risk is not None and risk is not None and risk >= stat_risk:
            priority = "stat"
        elif positive or ood:
            priority = "urgent"
        else:
            priority = "routine"
        models = tuple(dict.fromkeys(f"{a.algorithm.name} {a.algorithm.version}"
                                     for a in items))
        entries.append(WorklistEntry(study_key=study_key(uid, salt), risk=risk,
                                     priority=priority,
                                     reasons=tuple(reasons) or ("no positive finding",),
                                     models=models, updated=now,
                                     study_uid=uid if include_uid else None))
    return sorted(entries, key=WorklistEntry.sort_key)


def _connect(db_path: str | Path) -> sqlite3.Connection:
    db = sqlite3.connect(Path(db_path), isolation_level=None)
    db.execute(_SCHEMA)
    return db


def save_worklist(db_path: str | Path, entries: Iterable[WorklistEntry]) -> None:
    """Store (or replace) the entries of their studies in the ``worklist`` table.

    Rank with ``include_uid=True`` before saving, so the operator's table and
    ``worklist_json(..., include_uid=True)`` can show the study; an entry saved without it
    keeps the UID an earlier save stored."""
    db = _connect(db_path)
    try:
        with db:
            for e in entries:
                db.execute("INSERT INTO worklist (study_key, study_uid, entry) VALUES (?, ?, ?) "
                           "ON CONFLICT(study_key) DO UPDATE SET entry=excluded.entry, "
                           "study_uid=COALESCE(excluded.study_uid, worklist.study_uid)",
                           (e.study_key, e.study_uid,
                                                json.dumps(e.to_dict(include_uid=False))))
    finally:
        db.close()


def load_worklist(db_path: str | Path, include_uid: bool = False) -> list[WorklistEntry]:
    """The stored worklist, most urgent first."""
    if not Path(db_path).exists():
        raise ConfigError(f"no worklist database at {db_path}",
                          hint="point at the work folder of `meddx dicom listen/watch`")
    db = _connect(db_path)
    try:
        rows = db.execute("SELECT study_uid, entry FROM worklist").fetchall()
    finally:
        db.close()
    entries = [replace(WorklistEntry.from_dict(json.loads(raw)),
                       study_uid=uid if include_uid else None) for uid, raw in rows]
    return sorted(entries, key=WorklistEntry.sort_key)


def worklist_json(db_path: str | Path, include_uid: bool = False) -> dict[str, Any]:
    """The worklist as the service answers it: ``{"studies": [...]}``, most urgent first."""
    entries = load_worklist(db_path, include_uid=include_uid)
    return {"count": len(entries),
            "studies": [e.to_dict(include_uid=include_uid) for e in entries]}


def worklist_rows(entries: Iterable[WorklistEntry]) -> list[tuple[str, ...]]:
    """Rows for ``meddx dicom queue``'s table (columns: :data:`TABLE_HEADER`)."""
    return [(e.priority, "-" if e.risk is None else f"{e.risk:.3f}",
             e.study_uid or e.study_key, "; ".join(e.reasons), ", ".join(e.models),
             e.updated.strftime("%Y-%m-%d %H:%M:%S")) for e in entries]


def to_fhir(entry: WorklistEntry) -> Any:
    """The entry as a FHIR R4B ``Task`` (validated): priority, the study as focus (by its
    Study Instance UID identifier when the entry holds it, else by the salted study key), the
    risk and reasons as inputs."""
    from fhir.resources.R4B.task import Task

    if entry.study_uid:
        ident = {"system": STUDY_UID_SYSTEM, "value": f"urn:oid:{entry.study_uid}"}
    else:
        ident = {"system": STUDY_KEY_SYSTEM, "value": entry.study_key}
    inputs: list[dict[str, Any]] = [
        {"type": {"text": "reason"}, "valueString": r} for r in entry.reasons]
    if entry.risk is not None:
        inputs.insert(0, {"type": {"text": "risk"}, "valueDecimal": round(entry.risk, 6)})
    raw = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "priority": entry.priority,
        "code": {"text": "Read imaging study (prioritised by meddx)"},
        "description": "; ".join(entry.reasons),
        "focus": {"type": "ImagingStudy", "identifier": ident},
        "authoredOn": entry.updated.isoformat(),
        "lastModified": entry.updated.isoformat(),
        "input": inputs,
        "note": [{"text": "AI triage, not a diagnosis. Models: " + ", ".join(entry.models)}],
    }
    return Task.model_validate(raw)


def to_fhir_bundle(entries: Iterable[WorklistEntry]) -> dict[str, Any]:
    """The worklist as a FHIR R4B ``Bundle`` (type ``searchset``) of :func:`to_fhir` Tasks,
    most urgent first, validated; JSON-ready."""
    from fhir.resources.R4B.bundle import Bundle

    tasks = [to_fhir(e) for e in entries]
    raw = {"resourceType": "Bundle", "type": "searchset", "total": len(tasks),
           "timestamp": dt.datetime.now(dt.UTC).isoformat(),
           "entry": [{"fullUrl": f"urn:meddx:worklist:{e.study_key}",
                      "resource": t.model_dump(mode="json", exclude_none=True),
                      "search": {"mode": "match"}}
                     for e, t in zip(entries, tasks, strict=True)]}
    return Bundle.model_validate(raw).model_dump(mode="json", exclude_none=True)
