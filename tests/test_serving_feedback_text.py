"""CDS Hooks feedback keeps no text written by the EHR or its users (issue 23, point 2):
override reasons are kept only when the service offered them (its discovery document's
``overrideReasons``), every other coding counts as ``other``; card and suggestion ids only
as UUIDs; timestamps only as times. The monitoring report still counts them."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from meddx.monitoring.logs import read_feedback
from meddx.serving.cards import OVERRIDE_REASONS
from meddx.serving.cds import FeedbackRequest, FeedbackStore

PHI = ("Jane", "Doe", "MRN", "4711")


def _store(tmp_path: Path, feedback: list[dict]) -> tuple[Path, list[dict]]:
    store = FeedbackStore(tmp_path / "feedback.jsonl")
    store.add("svc", FeedbackRequest.model_validate({"feedback": feedback}),
              {"kind": "jwt", "iss": "https://ehr.test"})
    text = store.path.read_text()
    return store.path, [json.loads(line) for line in text.splitlines()]


def _overridden(card: str, reason: dict, **extra: object) -> dict:
    return {"card": card, "outcome": "overridden", "overrideReason": {"reason": reason},
            "outcomeTimestamp": "2026-01-01T10:00:00Z", **extra}


def test_only_the_services_own_override_reasons_are_kept(tmp_path) -> None:
    card = str(uuid.uuid4())
    offered = OVERRIDE_REASONS[1]
    path, rows = _store(tmp_path, [
        # an offered code, with the EHR's own display text
        _overridden(card, {**offered, "display": "Jane Doe (MRN 4711) was scanned twice"}),
        # the offered code without its system: still ours
        _overridden(card, {"code": offered["code"]}),
        # a code of the EHR's own: free text in code and display
        _overridden(card, {"system": "urn:ehr:reasons", "code": "Jane Doe MRN 4711",
                           "display": "Doe refused"}),
        # our code under another system is not ours
        _overridden(card, {"system": "urn:ehr:reasons", "code": offered["code"]}),
    ])
    text = path.read_text()
    assert not any(word in text for word in PHI), text
    assert rows[0]["overrideReason"] == offered
    assert rows[1]["overrideReason"] == offered
    assert rows[2]["overrideReason"] == {"code": "other"}
    assert rows[3]["overrideReason"] == {"code": "other"}
    entries, _ = read_feedback(path)
    assert [e.override_reason for e in entries] == [offered["code"]] * 2 + ["other"] * 2


def test_ids_and_timestamps_are_kept_only_in_their_own_shape(tmp_path) -> None:
    card, suggestion = str(uuid.uuid4()), str(uuid.uuid4())
    path, rows = _store(tmp_path, [
        {"card": "Jane Doe's card", "outcome": "accepted", "outcomeTimestamp": "Jane Doe",
         "acceptedSuggestions": [{"id": "MRN 4711"}, {"id": suggestion}]},
        {"card": card, "outcome": "overridden", "outcomeTimestamp": "2026-01-01T10:00:00+01:00",
         "overrideReason": {"userComment": "Jane Doe says otherwise"}},
    ])
    assert not any(word in path.read_text() for word in PHI)
    assert rows[0]["card"] is None and rows[0]["outcomeTimestamp"] is None
    assert rows[0]["acceptedSuggestions"] == [suggestion]
    assert rows[1]["card"] == card and rows[1]["outcomeTimestamp"].startswith("2026-01-01T10")
    assert rows[1]["has_comment"] is True and rows[1]["overrideReason"] is None
