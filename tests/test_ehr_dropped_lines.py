"""Every line the ICU readers leave out is counted by reason: per stay (``Sample.meta``), per
split while a dataset is read (kept by the feature cache), and for refused stays."""

from __future__ import annotations

import pandas as pd
import pytest

from icu_support import clean_body, write_stay
from meddx.config import DataConfig
from meddx.errors import DataError
from meddx.modalities.ehr.io import DROP_REASONS, count_dropped, read_physionet_stay
from meddx.modalities.ehr.modality import EHRModality

MESSY = ("10:45,,1.9\n"          # empty parameter name (the issue's example)
         "11:00,HR,abc\n"        # value not a number
         "11:00,HR,\n"           # empty value
         "1x:00,HR,80\n"         # time not HH:MM
         "12:00,Foo,3\n"         # unknown parameter
         "12:00,HR\n"            # two fields
         "13:00,pH,735\n"        # implausible (7.35 × 100)
         "13:00,HR,-1\n"         # -1 inside a series
         "14:00,Age,71\n"        # descriptor repeated
         "50:00,HR,90\n")        # after the first 48 h (left out when binned)


def test_reader_counts_every_dropped_line_by_reason(tmp_path):
    stay = read_physionet_stay(write_stay(tmp_path, 500001, clean_body() + MESSY))
    counts = count_dropped(stay.issues)
    assert counts == {"total": 9, "by_reason": {
        "unparsable_value": 2, "empty_parameter": 1, "unparsable_time": 1,
        "unknown_parameter": 1, "wrong_field_count": 1, "implausible_value": 1,
        "missing_value": 1, "repeated_descriptor": 1}}
    empty = [i for i in stay.issues if i.code == "empty_parameter"]
    assert [(i.source, i.line, i.item) for i in empty] == [("500001.txt", 14, "10:45,,1.9")]
    assert set(counts["by_reason"]) <= set(DROP_REASONS)
    with pytest.raises(DataError, match="empty parameter name") as e:
        read_physionet_stay(tmp_path / "500001.txt", on_malformed="error")
    assert e.value.context["line"] == 14


def test_prediction_meta_counts_window_and_fhir_drops(tmp_path):
    from icu_support import icu_package
    from meddx.modalities.ehr.fhir import physionet_to_bundle

    spec = icu_package(tmp_path / "pkg", {}, default=None).card.preprocessing
    path = write_stay(tmp_path, 500002, clean_body() + MESSY)
    s = EHRModality().read(path, spec)
    assert s.meta["dropped_lines"]["total"] == 10
    assert s.meta["dropped_lines"]["by_reason"]["out_of_window"] == 1
    assert s.meta["n_ignored"] == 10  # the same lines, listed one by one
    # FHIR: the Bundle of the same stay has only the good lines; add what an EHR may send
    bundle = physionet_to_bundle(path)
    obs = {"resourceType": "Observation", "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
           "effectiveDateTime": "2012-01-01T03:00:00Z"}
    bundle["entry"] += [
        {"resource": {**obs, "valueQuantity": {"value": 80, "unit": "kg", "code": "kg"}}},
        {"resource": {**obs, "status": "entered-in-error", "valueQuantity": {"value": 80}}},
        {"resource": {**obs, "valueString": "eighty"}},
        {"resource": {"resourceType": "MedicationRequest"}},
        {"resource": {"resourceType": "MedicationRequest"}}]
    counts = EHRModality().read(bundle, spec).meta["dropped_lines"]
    assert counts == {"total": 6, "by_reason": {
        "unused_resource": 2, "out_of_window": 1, "unit_not_convertible": 1,
        "unusable_status": 1, "no_numeric_value": 1}}


def test_refused_stay_says_what_was_left_out(tmp_path):
    from icu_support import icu_package

    spec = icu_package(tmp_path / "pkg", {}, default=None).card.preprocessing
    path = write_stay(tmp_path, 500003, "01:00,,1.9\n02:00,,3\n", weight=-1)
    with pytest.raises(DataError, match=r"cannot assess.*2 line\(s\) were left out "
                                        r"\(empty parameter name: 2\)"):
        EHRModality().read(path, spec)


def test_dataset_counts_per_split_and_the_cache_keeps_them(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDDX_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    ids = list(range(600001, 600021))
    for k, rid in enumerate(ids):
        body = clean_body(70 + k) + ("10:45,,1.9\n" if k % 4 == 0 else "")
        write_stay(root / "set-x", rid, body + ("12:00,Foo,1\n" if k % 5 == 0 else ""))
    write_stay(root / "set-x", 600099, "01:00,,2\n", weight=-1)  # refused: nothing usable
    pd.DataFrame({"RecordID": [*ids, 600099], "In-hospital_death": [k % 3 == 0 for k in
                                                                     range(21)]}).astype(
        {"In-hospital_death": int}).to_csv(root / "Outcomes-x.txt", index=False)
    data = DataConfig(path=str(root), modality="ehr", val_fraction=0.2, test_fraction=0.2,
                      calib_fraction=0.25, options={"progress": False})
    first = EHRModality().load(data, None, None, seed=0).info["dropped_lines"]
    again = EHRModality().load(data, None, None, seed=0).info["dropped_lines"]  # from cache
    assert first == again
    assert first["total"] == 5 + 4 + 1
    assert first["by_reason"] == {"empty_parameter": 6, "unknown_parameter": 4}
    assert first["refused_stays"] == {"stays": 1, "stays_with_dropped_lines": 1, "lines": 1,
                                      "by_reason": {"empty_parameter": 1}}
    splits = first["by_split"]
    assert list(splits) == ["train", "val", "calib", "test"]
    assert sum(s["stays"] for s in splits.values()) == 20
    assert sum(s["lines"] for s in splits.values()) == 9
    assert first["reasons"]["empty_parameter"] == "empty parameter name"
