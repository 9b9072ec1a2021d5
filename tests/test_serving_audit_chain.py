"""The hash-chained audit log (issue 16, point 6): ``meddx audit verify`` finds an edited,
deleted or reordered line and names it; the chain survives a restart; a log whose last line
does not verify is never extended."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meddx.cli import app
from meddx.errors import ServingError
from meddx.serving.audit import AuditLog
from meddx.serving.audit_chain import GENESIS, verify_log

runner = CliRunner()


def write_log(path: Path, n: int = 6) -> None:
    with AuditLog(path) as log:
        for i in range(n):
            log.prediction(route="/v1/models/{name}/predict", caller={"kind": "api-key",
                           "key_id": "ward-7"}, model={"name": "m", "version": "1",
                           "sha256": "ab" * 32}, inputs=[hashlib.sha256(bytes([i])).hexdigest()],
                           outputs=[{"label": "malignant", "probabilities": [0.1 * i, 0.9]}])


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def rewrite(path: Path, new: list[str]) -> None:
    path.write_text("".join(new))


@pytest.fixture
def log(tmp_path) -> Path:
    p = tmp_path / "audit.jsonl"
    write_log(p)
    return p


def test_intact_log_verifies_and_keeps_every_field(log):
    v = verify_log(log)
    assert v.ok and v.lines == 6 and v.bad_line is None
    records = [json.loads(x) for x in lines(log)]
    assert records[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] for a, b in zip(records, records[1:], strict=False))
    assert records[2]["event"] == "predict" and records[2]["caller"]["key_id"] == "ward-7"
    r = runner.invoke(app, ["audit", "verify", str(log)])
    assert r.exit_code == 0 and r.output.startswith("OK 6 lines") and v.last_hash in r.output


def test_edited_line_is_named(log):
    ls = lines(log)
    ls[2] = ls[2].replace("malignant", "benign")
    rewrite(log, ls)
    v = verify_log(log)
    assert (v.ok, v.bad_line) == (False, 3) and "edited" in v.reason
    r = runner.invoke(app, ["audit", "verify", str(log)])
    assert r.exit_code == 1 and "line 3" in r.output and "edited" in r.output


def test_edited_line_with_a_recomputed_hash_breaks_the_next_line(log):
    from meddx.serving.audit_chain import chain_line

    ls = lines(log)
    record = json.loads(ls[2])
    record["outputs"][0]["label"] = "benign"
    prev = record.pop("prev")
    record.pop("hash")
    ls[2], _ = chain_line(json.dumps(record, separators=(",", ":")), prev)
    rewrite(log, ls)
    v = verify_log(log)
    assert (v.ok, v.bad_line) == (False, 4) and "line 3 was rewritten" in v.reason


def test_deleted_line_is_named(log):
    ls = lines(log)
    del ls[3]
    rewrite(log, ls)
    v = verify_log(log)
    assert (v.ok, v.bad_line) == (False, 4) and "deleted" in v.reason


def test_deleted_first_line_is_named(log):
    rewrite(log, lines(log)[1:])
    v = verify_log(log)
    assert (v.ok, v.bad_line) == (False, 1) and "start of the log" in v.reason


def test_reordered_lines_are_named(log):
    ls = lines(log)
    ls[1], ls[2] = ls[2], ls[1]
    rewrite(log, ls)
    v = verify_log(log)
    assert (v.ok, v.bad_line) == (False, 2) and "moved" in v.reason


def test_lines_cut_from_the_end_are_found_with_the_noted_hash(log):
    noted = verify_log(log).last_hash
    rewrite(log, lines(log)[:-2])
    assert verify_log(log).ok  # a chain alone cannot see a cut at the end
    v = verify_log(log, expect=noted)
    assert not v.ok and "cut from the end" in v.reason
    r = runner.invoke(app, ["audit", "verify", str(log), "--expect", noted])
    assert r.exit_code == 1


def test_chain_survives_a_restart(log):
    write_log(log, 3)  # a second service run appends to the same file
    v = verify_log(log)
    assert v.ok and v.lines == 9


@pytest.mark.parametrize("damage", ["edited", "cut short"])
def test_log_whose_last_line_does_not_verify_is_not_extended(log, damage):
    ls = lines(log)
    ls[-1] = ls[-1].replace("malignant", "benign") if damage == "edited" else ls[-1][:40]
    rewrite(log, ls)
    before = log.read_bytes()
    with pytest.raises(ServingError, match="refusing to extend") as e:
        AuditLog(log)
    assert "meddx audit verify" in e.value.hint
    assert log.read_bytes() == before


def test_log_from_before_the_chain_is_continued_and_its_head_counted(tmp_path):
    p = tmp_path / "old.jsonl"
    p.write_text('{"time":"t0","event":"predict"}\n{"time":"t1","event":"error"}\n')
    write_log(p, 2)
    v = verify_log(p)
    assert v.ok and (v.lines, v.unchained) == (4, 2)
    ls = lines(p)
    ls.append('{"time":"t9","event":"predict"}\n')  # an unchained line after the chain
    rewrite(p, ls)
    v = verify_log(p)
    assert (v.ok, v.bad_line) == (False, 5) and "no hash" in v.reason


def test_chain_fields_cannot_be_overwritten_by_an_event(tmp_path):
    with AuditLog(tmp_path / "a.jsonl") as log, pytest.raises(ValueError):
        log.write({"event": "x", "hash": "0" * 64})
