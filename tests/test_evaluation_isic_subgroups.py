"""ISIC 2017: metadata (age, sex) exist for train and val only; the report's subgroup table is
built on the split that carries them and says which."""

from __future__ import annotations

import re

import pytest

from conftest import require_data
from evaluation_support import untrained_package
from meddx.evaluation import evaluate


@pytest.mark.slow
def test_isic_subgroups_by_sex_and_age_band_on_the_split_with_metadata(tmp_path):
    require_data("dermoscopy/isic2017/labels_derived.csv")
    package, bundle = untrained_package(
        {"name": "isic-tiny", "data": {"dataset": "isic2017", "size": 64, "limit": 60}},
        tmp_path / "model")
    r = evaluate(package, split="test", out=tmp_path / "eval", bootstrap=100, explain=False,
                 bundle=bundle)
    assert r.subgroups is not None and r.subgroups.split == "val"
    groups = {(row["column"], row["group"]) for row in r.subgroups.rows}
    assert {("sex", "female"), ("sex", "male")} <= groups
    assert {g for c, g in groups if c == "age band"} <= {"<30", "30-44", "45-59", "60-74", "75+"}
    assert len({g for c, g in groups if c == "age band"}) >= 2
    text = re.sub(r"<[^>]+>", " ", r.report.read_text())
    assert re.search(r"Analysed on the\s+val\s+split", text)
    assert "the test split carries no metadata" in text
    assert "age band" in text and "female" in text
