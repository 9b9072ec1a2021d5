"""PhysioNet 2012 readers, the LOINC mapping table, outcomes and the packaged record lists."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from conftest import require_data
from meddx.errors import DataError
from meddx.modalities.ehr.io import (
    read_outcomes,
    read_physionet_stay,
    read_split_list,
    series_variables,
    split_list_path,
    variables,
)

STAY = "ehr/physionet2012/set-a/132539.txt"


def test_mapping_table_keeps_similar_measurements_apart():
    table = variables()
    codes = {n: (v.system, v.code) for n, v in table.items() if v.code}
    assert len(set(codes.values())) == len(codes)
    # invasive vs non-invasive pressures, troponin I vs T: distinct codes
    for a, b in [("SysABP", "NISysABP"), ("DiasABP", "NIDiasABP"), ("MAP", "NIMAP"),
                 ("TroponinI", "TroponinT")]:
        assert codes[a] != codes[b]
    assert codes["SysABP"] == ("http://loinc.org", "76215-3")
    assert codes["NISysABP"] == ("http://loinc.org", "76534-7")
    for name in series_variables():
        v = table[name]
        assert v.code and v.ucum and v.plain, name
        assert v.aggregate in ("last", "sum", "max")
    assert len(series_variables()) == 37


def test_read_real_stay():
    stay = read_physionet_stay(require_data(STAY))
    assert stay.record_id == "132539"
    assert (stay.age, stay.sex, stay.height, stay.icu_type) == (54.0, "female", None, 4)
    assert stay.issues == []
    assert stay.events[0] == (7.0, "GCS", 15.0)  # 00:07 → 7 minutes after admission
    assert {n for _, n, _ in stay.events} <= set(series_variables())


def _write(tmp_path: Path, body: str, name: str = "200001.txt") -> Path:
    p = tmp_path / name
    p.write_text("Time,Parameter,Value\n" + body)
    return p


_HEADER = ("00:00,RecordID,200001\n00:00,Age,70\n00:00,Gender,1\n00:00,Height,-1\n"
           "00:00,ICUType,3\n00:00,Weight,80\n")


def test_malformed_lines_are_listed_with_file_and_line(tmp_path):
    body = _HEADER + ("01:00,HR,80\n"
                      "01:0x,HR,81\n"          # line 9: bad time
                      "02:00,Lactate,abc\n"    # line 10: bad value
                      "02:00,Foo,3\n"          # line 11: unknown parameter
                      "03:00,pH,735\n"         # line 12: implausible (7.35 × 100)
                      "03:00,Age,71\n"         # line 13: descriptor repeated
                      "04:00,HR\n")            # line 14: two fields
    stay = read_physionet_stay(_write(tmp_path, body))
    lines = [(i.source, i.line) for i in stay.issues]
    assert lines == [("200001.txt", n) for n in (9, 10, 11, 12, 13, 14)]
    assert "implausible pH" in stay.issues[3].reason
    assert stay.events == [(0.0, "Weight", 80.0), (60.0, "HR", 80.0)]
    assert stay.sex == "male" and stay.age == 70 and stay.icu_type == 3


def test_malformed_line_raises_in_error_mode(tmp_path):
    p = _write(tmp_path, _HEADER + "01:00,HR,80\n02:00,HR,eighty\n")
    with pytest.raises(DataError) as e:
        read_physionet_stay(p, on_malformed="error")
    assert e.value.context["line"] == 9 and "200001.txt" in str(e.value)


def test_not_a_stay_file(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(DataError, match="Time,Parameter,Value"):
        read_physionet_stay(p)


def test_outcomes_missing_saps_is_nan(tmp_path):
    p = tmp_path / "Outcomes-x.txt"
    p.write_text("RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death\n"
                 "1,12,3,5,-1,0\n2,-1,-1,9,4,1\n")
    o = read_outcomes([p])
    assert o.loc["1", "saps_i"] == 12 and math.isnan(o.loc["2", "saps_i"])
    assert o["in_hospital_death"].tolist() == [0, 1]
    p.write_text("RecordID,In-hospital_death\n1,2\n")
    with pytest.raises(DataError, match="0 or 1"):
        read_outcomes([p])


def test_packaged_split_lists_are_disjoint_complete_and_stratified():
    root = require_data("ehr/physionet2012")
    outcomes = read_outcomes([root / "Outcomes-a.txt", root / "Outcomes-b.txt"])
    lists = {s: read_split_list(split_list_path("physionet2012", s))
             for s in ("train", "val", "test")}
    ids = [r for v in lists.values() for r in v]
    assert len(ids) == len(set(ids)) == 8000
    assert set(ids) == set(outcomes.index)
    rates = [outcomes.loc[v, "in_hospital_death"].mean() for v in lists.values()]
    assert np.ptp(rates) < 0.005
    assert outcomes["saps_i"].isna().sum() == 352
