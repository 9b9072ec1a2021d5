"""The report's Input row is a short summary with the preprocessing tables in an appendix, and
external validation lists every stored operating point, the default first (issue 23,
point 20)."""

from __future__ import annotations

import re

import pytest

from icu_support import clean_body, icu_package, write_stay
from meddx.evaluation.external import validate
from meddx.reporting.report import input_summary

# the ICU card's default is "balanced" (no target); a target point sits beside it
POINTS = {
    "sensitivity@0.95": {"method": "sensitivity", "target": 0.95, "threshold": 0.999999,
                         "calib_sensitivity": 0.95, "calib_specificity": 0.2},
    "balanced": {"method": "balanced", "threshold": 0.5, "calib_sensitivity": 0.8,
                 "calib_specificity": 0.75},
}


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("icu_promises")
    pkg = icu_package(tmp, POINTS, default="balanced")
    folder = tmp / "other_centre"
    rows = ["RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death"]
    for i in range(30):
        write_stay(folder / "set-x", 410000 + i, clean_body(60 + 3 * i))
        rows.append(f"{410000 + i},10,2,5,-1,{int(i % 3 == 0)}")
    (folder / "Outcomes-x.txt").write_text("\n".join(rows) + "\n")
    result = validate(pkg.path, folder, out=tmp / "rep", bootstrap=100)
    return pkg, result, (tmp / "rep" / "report.html").read_text()


def test_every_stored_point_is_listed_default_first(external):
    _, result, html = external
    promises = result.external["promises"]
    assert [p["operating_point"] for p in promises] == ["balanced", "sensitivity@0.95"]
    assert promises[0]["default"] and promises[0]["target"] is None
    assert promises[0]["status"] in ("as on calibration", "below calibration")
    assert promises[1]["status"] == "broken"
    table = html[html.index('id="promises"'):]
    table = table[: table.index("</table>")]
    assert table.index("balanced (default)") < table.index("sensitivity@0.95")
    assert "no target (balanced); on calib: sensitivity 0.80, specificity 0.75" in table


def test_input_row_is_a_summary_and_the_normalisation_is_in_an_appendix(external):
    pkg, _, html = external
    stats = pkg.card.preprocessing["stats"]
    cell = re.search(r'<td id="input-summary">(.*?)</td>', html, flags=re.S).group(1)
    assert len(cell) < 600, cell
    assert "normalisation (mean, SD)" in cell and "Appendix A." in cell
    assert "HR" not in cell  # no per-variable figures in the row
    appendix = html[html.index('id="appendix-input"'):]
    mean, sd = stats["series"]["HR"]
    assert f"<th>series / HR</th><td class=\"num\">{mean:.4g}, {sd:.4g}</td>" in appendix


def test_input_summary_keeps_short_items_inline():
    out = input_summary({"size": 28, "value_range": [0, 255], "risk_bands": {"low": 0.1},
                         "variables": [f"v{i}" for i in range(30)]})
    assert out["summary"] == ["size 28", "value_range 0, 255", "risk_bands (low 0.1)",
                              "variables: 30 (Appendix A.1)"]
    assert [row[1] for row in out["appendix"][0]["rows"][:2]] == ["v0", "v1"]
