"""Worklist priority: one entry per study, stat/urgent/routine with reasons, highest risk first;
persisted, answered as JSON, and as a FHIR R4B Task that validates."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from meddx.dicom.model import Algorithm, SeriesAnalysis
from meddx.dicom.worklist import (
    TABLE_HEADER,
    WorklistEntry,
    load_worklist,
    rank,
    save_worklist,
    study_key,
    to_fhir,
    worklist_json,
    worklist_rows,
)
from meddx.errors import ConfigError
from meddx.inference.prediction import Prediction

SALT = "s3cret"
ALGO = Algorithm("breast", "1.0", "cd" * 32)
NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def _pred(risk: float, *, threshold: float = 0.5, ood: bool = False,
          refer: bool = False) -> Prediction:
    decided = None if ood else ("malignant" if risk >= threshold else "not malignant")
    return Prediction(
        id="x", probabilities={"malignant": risk, "normal": 1 - risk}, label="malignant",
        calibrated={"malignant": risk, "normal": 1 - risk}, decision=decided,
        operating_point=None if ood else "sensitivity@0.95",
        threshold=None if ood else threshold,
        prediction_set=["malignant", "normal"] if refer else ["malignant"], refer=refer,
        model={"name": "breast", "version": "1.0", "sha256": "cd" * 32,
               "positive_class": "malignant"}, ood=ood, ood_score=9.0 if ood else 0.1)


def _analysis(study: str, series: str, pred: Prediction, per_image=()) -> SeriesAnalysis:
    return SeriesAnalysis(study_uid=study, series_uid=series, sources=(Path("/x.dcm"),),
                          algorithm=ALGO, prediction=pred, per_image=per_image)


def test_priority_and_order_follow_decisions_ood_and_risk():
    analyses = [
        _analysis("1.1", "1.1.1", _pred(0.30)),                      # routine, low
        _analysis("1.2", "1.2.1", _pred(0.45)),                      # routine, higher
        _analysis("1.3", "1.3.1", _pred(0.60)),                      # urgent: positive
        _analysis("1.4", "1.4.1", _pred(0.20, ood=True)),            # urgent: OOD
        _analysis("1.5", "1.5.1", _pred(0.95)),                      # stat: positive ≥ 0.9
        _analysis("1.6", "1.6.1", _pred(0.10)),                      # one series negative …
        _analysis("1.6", "1.6.2", _pred(0.70)),                      # … another positive
    ]
    entries = rank(analyses, salt=SALT, include_uid=True, now=NOW)
    assert [(e.study_uid, e.priority) for e in entries] == [
        ("1.5", "stat"), ("1.6", "urgent"), ("1.3", "urgent"), ("1.4", "urgent"),
        ("1.2", "routine"), ("1.1", "routine")]
    by = {e.study_uid: e for e in entries}
    assert by["1.6"].risk == pytest.approx(0.70)  # the study's risk: its highest
    assert any("malignant at sensitivity@0.95" in r for r in by["1.3"].reasons)
    assert any("out of distribution" in r for r in by["1.4"].reasons)
    assert by["1.1"].reasons == ("no positive finding",)
    assert by["1.1"].models == ("breast 1.0",)
    assert by["1.1"].study_key == study_key("1.1", SALT) != study_key("1.1", "other salt")


def test_a_positive_image_makes_the_study_urgent_and_refer_is_a_reason():
    series = _analysis("2.1", "2.1.1", _pred(0.2, refer=True),
                       per_image=(("2.1.1.1", _pred(0.2)), ("2.1.1.2", _pred(0.8))))
    (entry,) = rank([series], salt=SALT, stat_risk=None, now=NOW)
    assert entry.priority == "urgent" and entry.risk == pytest.approx(0.8)
    assert any("refer to a reader" in r for r in entry.reasons)


def test_uid_only_when_asked_and_json_round_trip(tmp_path):
    analyses = [_analysis("3.1", "3.1.1", _pred(0.7)), _analysis("3.2", "3.2.1", _pred(0.1))]
    hidden = rank(analyses, salt=SALT, now=NOW)
    assert all(e.study_uid is None for e in hidden)
    assert "3.1" not in json.dumps([e.to_dict() for e in hidden])
    db = tmp_path / "state.db"
    save_worklist(db, rank(analyses, salt=SALT, include_uid=True, now=NOW))
    answer = worklist_json(db)
    assert answer["count"] == 2 and "3.1" not in json.dumps(answer)
    assert [s["priority"] for s in answer["studies"]] == ["urgent", "routine"]
    assert worklist_json(db, include_uid=True)["studies"][0]["study_uid"] == "3.1"
    assert load_worklist(db) == hidden
    # a new analysis of a study replaces its entry
    save_worklist(db, rank([_analysis("3.2", "3.2.1", _pred(0.99))], salt=SALT, now=NOW))
    assert [e.priority for e in load_worklist(db)] == ["stat", "urgent"]
    rows = worklist_rows(load_worklist(db, include_uid=True))
    assert len(rows[0]) == len(TABLE_HEADER) and rows[0][:3] == ("stat", "0.990", "3.2")
    with pytest.raises(ConfigError, match="no worklist database"):
        worklist_json(tmp_path / "missing.db")


def test_fhir_task_validates_with_priority_focus_and_risk():
    from fhir.resources.R4B.task import Task

    (entry,) = rank([_analysis("4.1", "4.1.1", _pred(0.93))], salt=SALT, include_uid=True,
                    now=NOW)
    task = to_fhir(entry)
    again = Task.model_validate_json(task.model_dump_json())  # R4B round trip
    assert again.priority == "stat" and again.status == "requested"
    assert again.focus.type == "ImagingStudy"
    assert again.focus.identifier.value == "urn:oid:4.1"
    assert again.input[0].type.text == "risk" and float(again.input[0].valueDecimal) == 0.93
    hidden = to_fhir(rank([_analysis("4.1", "4.1.1", _pred(0.93))], salt=SALT, now=NOW)[0])
    assert "4.1" not in hidden.model_dump_json()
    assert hidden.focus.identifier.value == study_key("4.1", SALT)


def test_bad_priority_and_settings_are_config_errors():
    with pytest.raises(ConfigError, match="unknown priority"):
        WorklistEntry("k", 0.5, "high", (), (), NOW)
    with pytest.raises(ConfigError, match="stat_risk"):
        rank([], salt=SALT, stat_risk=1.5)
    with pytest.raises(ConfigError, match="salt"):
        rank([_analysis("5.1", "5.1.1", _pred(0.1))], salt="")
