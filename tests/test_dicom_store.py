"""The DICOM work folder's state: idempotency by SOP Instance UID, restarts, salted keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from meddx.dicom.store import Store


def _add(store: Store, sop: str, study: str = "1.2.3", series: str = "1.2.3.1", now: float = 0.0
         ) -> bool:
    return store.add_instance(sop_uid=sop, study_uid=study, series_uid=series,
                              sop_class="1.2.840.10008.5.1.4.1.1.2", path=Path(f"/x/{sop}.dcm"),
                              size=10, calling_ae="PACS", now=now)


def test_same_sop_uid_twice_is_one_instance(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert _add(store, "1.9.1")
    assert not _add(store, "1.9.1")
    counts = store.counts()
    assert counts["received"] == 1 and counts["duplicates"] == 1 and counts["pending"] == 1


def test_state_survives_a_restart_and_half_done_study_is_resumed(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for i in range(3):
        _add(store, f"1.9.{i}", now=100.0)
    store.mark_analysed(["1.9.0"])  # the process was killed after the first image
    assert store.complete_studies(quiet=10, now=105.0) == []  # still within the quiet interval

    again = Store(tmp_path)  # a new process on the same work folder
    assert again.complete_studies(quiet=10, now=120.0) == ["1.2.3"]
    assert [r.sop_uid for r in again.pending_instances("1.2.3")] == ["1.9.1", "1.9.2"]
    again.mark_analysed(["1.9.1"])
    again.fail(["1.9.2"], "decode-failure", "pixel data truncated", study_uid="1.2.3")
    again.finish_study("1.2.3")
    assert again.complete_studies(quiet=10, now=200.0) == []
    c = again.counts()
    assert c["received"] == c["analysed"] + c["failed"] == 3


def test_study_key_is_a_salted_hash_never_the_uid(tmp_path: Path) -> None:
    a = Store(tmp_path / "a")
    key = a.study_key("1.2.840.99")
    assert "1.2.840.99" not in key and len(key) == 16
    assert Store(tmp_path / "a").study_key("1.2.840.99") == key  # salt kept in the folder
    assert Store(tmp_path / "b").study_key("1.2.840.99") != key  # another folder, another salt
    assert oct((tmp_path / "a" / "salt").stat().st_mode)[-3:] == "600"


def test_failure_list_keeps_reasons_and_names_studies_by_key(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _add(store, "1.9.1")
    store.fail(["1.9.1"], "no-matching-model", "breast: Modality CT not in ['US']",
               study_uid="1.2.3")
    (f,) = store.failures()
    assert f["reason"] == "no-matching-model" and "Modality CT" in f["detail"]
    assert f["study"] == store.study_key("1.2.3")
    with pytest.raises(ValueError, match="unknown failure reason"):
        store.fail(["1.9.1"], "whatever", "")
