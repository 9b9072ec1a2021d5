"""The hash-chained audit log and ``meddx audit verify``."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from meddx.cli import app
from meddx.serving.audit import GENESIS, AuditLog, verify_log

runner = CliRunner()


def _log(path, n=5):
    with AuditLog(path) as log:
        for i in range(n):
            log.prediction(route="/v1/models/{name}/predict", caller={"id": "k"},
                           model={"name": "m", "version": "1", "sha256": "ab"},
                           inputs=[f"{i:064x}"], outputs=[{"label": "x", "probabilities": [0.25,
                                                                                          0.75]}])
    return path.read_text().splitlines()


def _rewrite(path, lines):
    path.write_text("\n".join(lines) + "\n")


def test_lines_are_chained_and_keep_their_fields(tmp_path):
    lines = [json.loads(x) for x in _log(tmp_path / "a.jsonl")]
    assert lines[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] for a, b in zip(lines, lines[1:], strict=False))
    assert lines[0]["event"] == "predict" and lines[0]["inputs"] == [f"{0:064x}"]
    check = verify_log(tmp_path / "a.jsonl")
    assert check.ok and check.lines == 5 and check.head == lines[-1]["hash"]


def test_chain_continues_across_reopen(tmp_path):
    p = tmp_path / "a.jsonl"
    first = _log(p, 3)
    with AuditLog(p) as log:
        assert log.head == json.loads(first[-1])["hash"]
        log.write({"event": "later"})
    lines = [json.loads(x) for x in p.read_text().splitlines()]
    assert lines[3]["prev"] == lines[2]["hash"] and "chain" not in lines[3]
    assert verify_log(p).ok and verify_log(p).lines == 4


def test_edited_line_is_named(tmp_path):
    p = tmp_path / "a.jsonl"
    lines = _log(p)
    lines[2] = lines[2].replace('"label":"x"', '"label":"y"')
    _rewrite(p, lines)
    check = verify_log(p)
    assert (check.bad_line, check.reason.split(":")[0]) == (3, "edited")


def test_deleted_line_is_named(tmp_path):
    p = tmp_path / "a.jsonl"
    lines = _log(p)
    del lines[1]
    _rewrite(p, lines)
    check = verify_log(p)
    assert check.bad_line == 2 and "deleted" in check.reason
    _rewrite(p, _log(tmp_path / "b.jsonl")[1:])  # the first line deleted
    assert verify_log(p).bad_line == 1


def test_reordered_lines_are_named(tmp_path):
    p = tmp_path / "a.jsonl"
    lines = _log(p)
    lines[2], lines[3] = lines[3], lines[2]
    _rewrite(p, lines)
    check = verify_log(p)
    assert check.bad_line == 3 and "reordered" in check.reason


def test_not_json_line_is_named(tmp_path):
    p = tmp_path / "a.jsonl"
    lines = _log(p)
    lines.insert(2, "garbage")
    _rewrite(p, lines)
    assert (verify_log(p).bad_line, verify_log(p).reason) == (3, "not JSON")


@pytest.mark.parametrize("damage", ["torn", "edited"])
def test_corrupt_last_line_restarts_the_chain_and_stays_reported(tmp_path, damage):
    p = tmp_path / "a.jsonl"
    lines = _log(p, 3)
    if damage == "torn":  # a crash mid-write: half a line, no newline
        p.write_text("\n".join(lines) + "\n" + lines[2][:40])
    else:
        lines[2] = lines[2].replace('"label":"x"', '"label":"z"')
        _rewrite(p, lines)
    with AuditLog(p) as log:
        assert log.head == GENESIS
        log.write({"event": "after"})
    new = p.read_text().splitlines()
    last = json.loads(new[-1])
    assert last["chain"] == "restarted" and last["prev"] == GENESIS and last["chain_reason"]
    check = verify_log(p)
    assert check.bad_line == (4 if damage == "torn" else 3)  # the damage is still named
    # once the damaged line is dealt with, the restarted segment verifies and is reported
    del new[check.bad_line - 1]
    _rewrite(p, new)
    check = verify_log(p)
    assert check.ok and check.restarts == [(len(new), last["chain_reason"])]


def test_log_from_before_chaining_is_continued_as_a_new_segment(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"time":"t","event":"predict"}\n{"time":"t","event":"error"}\n')
    with AuditLog(p) as log:
        log.write({"event": "chained"})
    check = verify_log(p)
    assert check.ok and check.unchained == 2 and check.restarts[0][0] == 3


def test_cli_audit_verify(tmp_path):
    p = tmp_path / "a.jsonl"
    lines = _log(p)
    r = runner.invoke(app, ["audit", "verify", str(p)])
    assert r.exit_code == 0 and "OK: 5 lines" in r.output
    del lines[3]
    _rewrite(p, lines)
    r = runner.invoke(app, ["audit", "verify", str(p)])
    assert r.exit_code == 1 and "line 4" in r.output and "deleted" in r.output
