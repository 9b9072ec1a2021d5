"""Subgroup analysis: age bands, flags for a subgroup wholly below overall, small-n warnings."""

from __future__ import annotations

import numpy as np
import pandas as pd

from meddx.statistics.subgroups import age_bands, subgroup_analysis
from meddx.tasks import TaskSpec

BINARY = TaskSpec(kind="binary", class_names=["melanoma", "other"], positive_class="melanoma")


def test_age_bands():
    s = pd.Series([5, 29.9, 30, 44, 45, 60, 74, 75, 90, None, "?"])
    assert age_bands(s).tolist() == ["<30", "<30", "30-44", "30-44", "45-59", "60-74",
                                     "60-74", "75+", "75+", pd.NA, pd.NA]


def test_subgroup_worse_on_one_sex_is_flagged_and_small_groups_warned():
    rng = np.random.default_rng(0)
    n = 1200
    sex = rng.choice(["female", "male"], n)
    y = rng.integers(0, 2, n)
    signal = np.where(sex == "female", 2.5, 0.2)  # the model barely works for men
    s = (2 * y - 1) * signal + rng.normal(0, 1, n)
    p = 1 / (1 + np.exp(-s))
    probs = np.column_stack([p, 1 - p])
    age = rng.integers(20, 90, n).astype(float)
    age[:5] = np.nan
    meta = pd.DataFrame({"sex": sex, "age_approximate": age, "image_id": [f"i{i}" for i in range(n)],
                         "site": ["a"] * (n - 8) + ["b"] * 8})
    res = subgroup_analysis(BINARY, y, probs, meta, n_resamples=300, seed=0)
    auroc = {(r["column"], r["group"]): r for r in res.rows if r["metric"] == "auroc"}
    assert auroc[("sex", "male")]["flag"] and not auroc[("sex", "female")]["flag"]
    assert auroc[("sex", "male")]["gap"] < -0.2
    assert [g for c, g in auroc if c == "age band"] == ["<30", "30-44", "45-59", "60-74", "75+"]
    assert auroc[("site", "b")]["warning"].startswith("too small")
    assert auroc[("sex", "male")]["warning"] is None
    assert any("image_id" in note for note in res.notes)
    assert any("without a value" in note for note in res.notes)
    assert len(res.to_frame()) == len(res.rows)
