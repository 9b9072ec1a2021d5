"""Side inputs beside the image (issue 24, point 2): the config option, the late fusion fitted on
calib and listed in the card, the Predictor, `meddx predict --side-inputs`, the evaluation, and
an image-only package left as it was."""

from __future__ import annotations

import json
import shutil
from datetime import date

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from meddx.cli import app
from meddx.config import parse_config
from meddx.errors import ConfigError, DataError
from meddx.inference import Predictor
from meddx.package import ModelCard, load_package
from meddx.sideinputs import PRESETS, from_patient, parse_records
from sideinputs_support import trained

runner = CliRunner()


@pytest.fixture(scope="module")
def side():
    return trained(True)


@pytest.fixture(scope="module")
def plain():
    return trained(False)


def _test_images(data, n: int = 4) -> list[str]:
    table = pd.read_csv(data / "labels.csv")
    return [str(data / p) for p in table[table.split == "test"].path.head(n)]


# ------------------------------------------------------------------ config and card
def test_config_takes_preset_names_and_refuses_unknown_ones() -> None:
    cfg = parse_config({"side_inputs": ["age", "sex", "site"]})
    assert [s.name for s in cfg.side_inputs] == ["age", "sex", "site"]
    assert cfg.side_inputs[0].unit == "years"
    with pytest.raises(ConfigError, match="unknown side input 'agee'.*did you mean 'age'"):
        parse_config({"side_inputs": ["agee"]})
    with pytest.raises(ConfigError, match="named twice"):
        parse_config({"side_inputs": ["age", "age"]})


def test_card_lists_the_inputs_with_units_and_allowed_values(side) -> None:
    package, _ = side
    fusion = package.card.side_inputs
    expects = {e["name"]: e for e in fusion.expects()}
    assert expects["age"]["unit"] == "years" and expects["age"]["range"] == [0, 120]
    assert expects["sex"]["allowed"] == ["female", "male"]
    assert "missing flag" in expects["age"]["encoding"]
    assert fusion.fitted_on == "calib" and fusion.n_fit > 20
    assert fusion.missing_in_fit["age"] > 0  # every 10th age is "unknown" in the data
    # the data's melanoma patients are the oldest: the fitted age weight says so
    mel = package.card.task.class_names.index("melanoma")
    assert fusion.coef[mel][fusion.features.index("age")] > 0.5
    # the post-hoc fits act on the fused logits: the card still has them all
    assert package.card.calibration and package.card.conformal and package.card.operating_points


def test_fusion_beats_the_image_alone_on_val(side) -> None:
    """The image network learnt nothing from noise; age carries the label: the fused model
    must rank melanoma far better on val (held out from the calib fit)."""
    package, _ = side
    from meddx.modalities.loading import load_bundle

    bundle = load_bundle(package.card.training["config"])
    val = bundle.splits["val"]
    predictor = Predictor(package, backend="torch")
    y = (np.asarray(val.targets) == package.card.task.class_names.index("melanoma")).astype(int)
    _, fused = predictor.predict_split(val)
    _, image = predictor.predict_split(val, fused=False)
    assert roc_auc_score(y, fused[:, 0]) > 0.9
    assert roc_auc_score(y, fused[:, 0]) > roc_auc_score(y, image[:, 0]) + 0.2


# ------------------------------------------------------------------ the Predictor
def test_predict_uses_age_and_flags_missing_values(side) -> None:
    package, data = side
    predictor = Predictor(package, backend="torch")
    image = _test_images(data, 1)[0]
    old, young, unknown = predictor.predict([image] * 3, side_inputs=[
        {"age": 80, "sex": "male"}, {"age": 20, "sex": "male"}, None])
    assert old.probabilities["melanoma"] > young.probabilities["melanoma"] + 0.2
    assert old.notes["side_inputs"] == {"used": {"age": 80.0, "sex": "male"}, "missing": [],
                                        "source": "argument"}
    assert unknown.notes["side_inputs"]["missing"] == ["age", "sex"]
    # nothing said at all: every input missing, and the notes say so
    (bare,) = predictor.predict([image])
    assert bare.notes["side_inputs"]["missing"] == ["age", "sex"]
    assert bare.notes["side_inputs"]["source"] == "none given"


@pytest.mark.parametrize("record, message", [
    ({"age": -3}, "outside 0–120 years"),
    ({"age": "fifty"}, "is not a number"),
    ({"age": True}, "is not a number"),
    ({"sex": "alien"}, "is not one of its categories"),
    ({"agee": 50}, "unknown side input 'agee'.*did you mean 'age'"),
])
def test_bad_side_inputs_are_refused_with_a_reason(side, record, message) -> None:
    package, data = side
    predictor = Predictor(package, backend="torch")
    with pytest.raises(DataError, match=message) as e:
        predictor.predict(_test_images(data, 1), side_inputs=[record])
    assert e.value.hint and e.value.status_code == 422


def test_values_are_parsed_and_unknown_spellings_mean_missing() -> None:
    inputs = [PRESETS["age"], PRESETS["sex"], PRESETS["site"]]
    (v,) = parse_records(inputs, [{"age_approximate": "55", "sex": " Female ",
                                   "anatom_site_general": "unknown"}])
    assert v == {"age": 55.0, "sex": "female", "site": None}


def test_fhir_patient_gives_age_at_the_service_date_and_sex() -> None:
    rec, notes = from_patient({"resourceType": "Patient", "birthDate": "1950-06-15",
                               "gender": "female"}, date(2026, 6, 14))
    assert rec == {"age": 75, "sex": "female"} and notes == []
    rec, _ = from_patient({"resourceType": "Patient", "birthDate": "1950-06-15"},
                          date(2026, 6, 15))
    assert rec == {"age": 76}
    rec, notes = from_patient({"resourceType": "Patient", "gender": "other"}, date(2026, 1, 1))
    assert rec == {} and any("birthDate absent" in n for n in notes) \
        and any("gender other" in n for n in notes)
    with pytest.raises(DataError, match="not a FHIR date"):
        from_patient({"resourceType": "Patient", "birthDate": "15/06/1950"}, date(2026, 1, 1))
    with pytest.raises(DataError, match="gender"):
        from_patient({"resourceType": "Patient", "gender": "f"}, date(2026, 1, 1))


# ------------------------------------------------------------------ the CLI
def test_cli_reads_a_side_input_csv_beside_the_images(side, tmp_path) -> None:
    package, data = side
    images = _test_images(data, 3)
    ids = [p.rsplit("/", 1)[1].removesuffix(".png") for p in images]
    # first: old man; second: an empty age cell; third: no row at all
    (tmp_path / "meta.csv").write_text(f"image_id,age,sex\n{ids[0]},85,male\n{ids[1]},,female\n")
    r = runner.invoke(app, ["predict", str(package.path), *images, "--side-inputs",
                            str(tmp_path / "meta.csv"), "--format", "json"])
    assert r.exit_code == 0, r.output
    preds = {p["id"]: p for p in json.loads(r.stdout)["predictions"]}
    first, second, third = (preds[f"{i}.png"]["notes"]["side_inputs"] for i in ids)
    assert first == {"used": {"age": 85.0, "sex": "male"}, "missing": [], "source": "csv"}
    assert second["missing"] == ["age"] and third["missing"] == ["age", "sex"]
    assert "2 of 3 inputs predicted with side inputs missing" in r.stderr
    csv_out = runner.invoke(app, ["predict", str(package.path), *images, "--side-inputs",
                                  str(tmp_path / "meta.csv"), "--format", "csv"]).stdout
    assert "side_inputs_missing" in csv_out.splitlines()[0]


def test_cli_refuses_a_bad_row_and_names_the_input(side, tmp_path) -> None:
    package, data = side
    images = _test_images(data, 2)
    ids = [p.rsplit("/", 1)[1].removesuffix(".png") for p in images]
    (tmp_path / "meta.csv").write_text(f"path,age,sex\n{ids[0]}.png,130,male\n"
                                       f"{ids[1]}.png,40,female\n")
    r = runner.invoke(app, ["predict", str(package.path), *images, "--side-inputs",
                            str(tmp_path / "meta.csv"), "--format", "json"])
    assert r.exit_code == 1
    out = json.loads(r.stdout)
    assert [e["id"] for e in out["errors"]] == [f"{ids[0]}.png"]
    assert "outside 0–120" in out["errors"][0]["error"] and len(out["predictions"]) == 1
    (tmp_path / "noid.csv").write_text("age,sex\n40,female\n")
    r = runner.invoke(app, ["predict", str(package.path), *images, "--side-inputs",
                            str(tmp_path / "noid.csv")])
    # the CLI's entry point prints message and hint for a MeddxError; the runner keeps it
    assert isinstance(r.exception, DataError) and "no id column" in str(r.exception)


# ------------------------------------------------------------------ image-only packages
def test_an_image_only_package_is_unchanged(plain, side, tmp_path) -> None:
    package, data = plain
    assert package.card.side_inputs is None
    card = json.loads((package.path / "card.json").read_text())
    card.pop("side_inputs")  # a card written before side inputs existed still loads
    assert ModelCard.model_validate(card).side_inputs is None
    predictor = Predictor(package, backend="torch")
    (p,) = predictor.predict(_test_images(data, 1))
    assert "side_inputs" not in p.notes
    with pytest.raises(DataError, match="takes no side inputs"):
        predictor.predict(_test_images(data, 1), side_inputs=[{"age": 50}])
    (tmp_path / "meta.csv").write_text("id,age\nx,50\n")
    r = runner.invoke(app, ["predict", str(package.path), *_test_images(data, 1),
                            "--side-inputs", str(tmp_path / "meta.csv")])
    assert isinstance(r.exception, ConfigError) and "takes no side inputs" in str(r.exception)
    # the fused package's image network is the same kind of network: fusion adds no weights
    assert set(load_package(side[0].path).state_dict) == set(package.state_dict)


# ------------------------------------------------------------------ evaluation
@pytest.mark.slow
def test_evaluation_scores_the_fused_model_and_its_subgroups(side, tmp_path) -> None:
    from meddx.evaluation import evaluate

    package, _ = side
    shutil.copytree(package.path, tmp_path / "model")
    r = evaluate(tmp_path / "model", split="test", out=tmp_path / "eval", bootstrap=50,
                 explain=False)
    assert r.subgroups is not None and r.subgroups.split == "test"
    groups = {(row["column"], row["group"]) for row in r.subgroups.rows}
    assert {("sex", "female"), ("sex", "male")} <= groups
    assert any(c == "age band" for c, _ in groups)
    # the figures are the fused model's: age carries the label in these data
    y = (np.asarray(r.targets) == 0).astype(int)
    assert roc_auc_score(y, r.probs[:, 0]) > 0.9
    text = r.report.read_text()
    assert "Side inputs" in text and "age (years)" in text


def test_one_age_rule_for_side_inputs_and_icu_stays():
    """A partial birth date stands for the middle of its span, in both places that need an age
    (a `Patient` for side inputs, an ICU stay's start); an unreadable one is missing in the EHR."""
    from datetime import date, datetime

    from meddx.modalities.ehr.fhir import _age_from_birthdate
    from meddx.sideinputs import age_in_years

    for birth, on, years in (("1950", date(2020, 3, 1), 69), ("1950", date(2020, 8, 1), 70),
                             ("1950-06", date(2020, 6, 10), 69), ("1950-06-10", date(2020, 6, 10), 70)):
        assert age_in_years(birth, on) == years
        assert _age_from_birthdate(birth, datetime(on.year, on.month, on.day, 8)) == float(years)
    assert from_patient({"resourceType": "Patient", "birthDate": "1950"}, on="2020-03-01")[0] \
        == {"age": 69}
    assert _age_from_birthdate("June 1950", datetime(2020, 1, 1)) is None
