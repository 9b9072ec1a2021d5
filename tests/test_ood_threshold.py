"""The OOD detector's false-alarm threshold: cross-fitted train scores pooled with calib, what
the card records about it, config errors, and packages written before it (issue 24 point 5).

A realised false-alarm rate on held-out data is too noisy to test on a small model; these tests
check the mechanics: the cross-fitted scores are out of fold, n is recorded, the threshold is the
conformal quantile of exactly the pooled scores, and old cards flag as they did.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from meddx.config import EvaluationConfig, parse_config
from meddx.errors import ConfigError, EvaluationError
from meddx.inference import Predictor, load_model
from meddx.package import load_package, sha256_file
from meddx.statistics.ood import (
    SHIFT_P,
    MahalanobisScorer,
    crossfit_scores,
    false_alarm_distribution,
    false_alarm_threshold,
    pool_scores,
)


def _gaussians(n: int, d: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = rng.integers(0, 2, n)
    return rng.normal(size=(n, d)) + 3.0 * c[:, None], c


# ------------------------------------------------------------------------ the statistics
def test_crossfit_scores_are_out_of_fold():
    f, c = _gaussians(200, d=40)  # many features for the cases, as 512 for a few hundred
    scores, fold = crossfit_scores(f, c, folds=5, seed=3)
    assert sorted(np.unique(fold)) == [0, 1, 2, 3, 4]
    for k in range(5):
        held = fold == k
        assert 30 <= held.sum() <= 50
        # each fold's scores are those of Gaussians fitted on the other folds only
        other = MahalanobisScorer().fit(f[~held], c[~held])
        np.testing.assert_allclose(scores[held], other.score(f[held]))
    # and therefore larger than in-sample scores (the leak cross-fitting removes); the gap
    # grows with the dimension over the number of cases
    in_sample = MahalanobisScorer().fit(f, c).score(f)
    assert scores.mean() > in_sample.mean() * 1.03
    # on exchangeable data their quantile is that of fresh data's scores, not in-sample's
    g, _ = _gaussians(20_000, d=40, seed=1)
    fresh = MahalanobisScorer().fit(f, c).score(g)
    thr_oof, thr_in = false_alarm_threshold(scores, 0.05), false_alarm_threshold(in_sample, 0.05)
    assert thr_oof > thr_in
    assert abs(np.mean(fresh > thr_oof) - 0.05) < abs(np.mean(fresh > thr_in) - 0.05)


def test_crossfit_keeps_a_patient_in_one_fold():
    f, c = _gaussians(120)
    groups = np.repeat(np.arange(30), 4)
    _, fold = crossfit_scores(f, c, folds=4, groups=groups)
    for g in range(30):
        assert len(set(fold[groups == g])) == 1
    with pytest.raises(EvaluationError, match="patients are too few") as e:
        crossfit_scores(f, c, folds=5, groups=np.repeat(np.arange(3), 40))
    assert "ood_folds" in e.value.hint


def test_crossfit_refuses_too_few_rows_with_a_hint():
    f, c = _gaussians(7)
    with pytest.raises(EvaluationError, match="too few for 5") as e:
        crossfit_scores(f, c, folds=5)
    assert "ood_threshold_scores: calib" in e.value.hint


def test_false_alarm_distribution_known_answer_and_coverage():
    # n = 19, a = 0.05: the threshold is the largest score; its false-alarm rate is Beta(1, 19)
    d = false_alarm_distribution(19, 0.05)
    assert d["expected"] == pytest.approx(0.05)
    assert d["low"] == pytest.approx(1 - 0.975 ** (1 / 19))
    assert d["high"] == pytest.approx(1 - 0.025 ** (1 / 19))
    # 82 calib cases (the BreastMNIST demo): a 5% promise realises 1.3-10.3%
    d82 = false_alarm_distribution(82, 0.05)
    assert d82["low"] == pytest.approx(0.0134, abs=5e-4)
    assert d82["high"] == pytest.approx(0.1032, abs=5e-4)
    # simulated calibration draws: the rate of each draw's threshold on uniform scores is
    # 1 - threshold; 95% of them fall in the interval
    rng = np.random.default_rng(0)
    rates = np.array([1 - false_alarm_threshold(rng.random(82), 0.05) for _ in range(4000)])
    inside = np.mean((rates >= d82["low"]) & (rates <= d82["high"]))
    assert 0.93 < inside < 0.97
    assert rates.mean() == pytest.approx(d82["expected"], abs=0.002)
    with pytest.raises(EvaluationError):
        false_alarm_distribution(10, 0.05)


# --------------------------------------------------------------------------- the config
@pytest.mark.parametrize("evaluation, where", [
    ({"ood_folds": 1}, "evaluation.ood_folds"),
    ({"ood_folds": 5.5}, "evaluation.ood_folds"),
    ({"ood_threshold_scores": "train"}, "evaluation.ood_threshold_scores"),
])
def test_threshold_options_are_validated(evaluation, where):
    with pytest.raises(ConfigError, match=where) as e:
        parse_config({"evaluation": evaluation})
    assert e.value.hint


def test_threshold_defaults():
    cfg = EvaluationConfig()
    assert cfg.ood_threshold_scores == "auto" and cfg.ood_folds == 5


def test_pool_scores_leaves_out_train_scores_that_differ():
    rng = np.random.default_rng(0)
    calib, same, lower = rng.normal(size=100), rng.normal(size=500), rng.normal(size=500) - 0.5
    pool, used, p = pool_scores(calib, same, "auto")
    assert used == "crossfit" and len(pool) == 600 and p >= SHIFT_P
    np.testing.assert_array_equal(pool[:100], calib)
    # a network that memorised its train cases: their scores sit lower than new cases'
    pool, used, p = pool_scores(calib, lower, "auto")
    assert used == "calib" and len(pool) == 100 and p < 0.001
    assert pool_scores(calib, lower, "crossfit")[1] == "crossfit"  # forced
    pool, used, p = pool_scores(calib, same, "calib")
    assert used == "calib" and p is None and len(pool) == 100


# --------------------------------------------------------------------------- a package
def _scores(package, bundle):
    from meddx.training.ood import _classes

    predictor = Predictor(package, backend="torch")
    predictor.watch_features(package.card.ood.layer)
    _, f_train = predictor.split_outputs(bundle.splits["train"], features=True)
    _, f_calib = predictor.split_outputs(bundle.splits["calib"], features=True)
    return f_train, f_calib, _classes(package, np.asarray(bundle.splits["train"].targets))


@pytest.fixture(scope="module")
def breast_bundle(tiny_breast_package):
    from meddx.modalities.loading import load_bundle

    return load_bundle(tiny_breast_package.card.training["config"])


def _refit(tiny_breast_package, tmp_path, bundle, **options):
    from meddx.training.ood import fit_ood_detector

    folder = tmp_path / "pkg"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(tiny_breast_package.path, folder)
    package = load_package(folder)
    return package, fit_ood_detector(package, bundle, EvaluationConfig(**options))


def test_card_records_the_threshold_scores(tiny_breast_package, breast_bundle):
    """The default ("auto"): out-of-fold train scores tested against calib's, pooled unless
    they differ; the card says which, on how many, and what that promises."""
    pkg, bundle = tiny_breast_package, breast_bundle
    ood = pkg.card.ood
    n_train, n_calib = len(bundle.splits["train"]), len(bundle.splits["calib"])
    assert ood.folds == 5 and ood.n_calib == n_calib and ood.n_crossfit == n_train
    f_train, f_calib, classes = _scores(pkg, bundle)
    calib = MahalanobisScorer().fit(f_train, classes).score(f_calib)
    oof, _ = crossfit_scores(f_train, classes, 5, seed=0)
    assert ood.crossfit_shift_p == pytest.approx(mannwhitneyu(calib, oof).pvalue)
    pooled = ood.crossfit_shift_p >= SHIFT_P
    assert ood.threshold_scores == ("crossfit" if pooled else "calib")
    assert ood.threshold_fitted_on == ("calib+train" if pooled else "calib")
    pool = np.r_[calib, oof] if pooled else calib
    assert ood.n_threshold == len(pool)
    assert ood.threshold == pytest.approx(false_alarm_threshold(pool, 0.05), rel=1e-6)
    d = false_alarm_distribution(ood.n_threshold, 0.05)
    assert ood.expected_false_alarm == pytest.approx(d["expected"])
    assert ood.false_alarm_interval == pytest.approx([d["low"], d["high"]])


def test_forced_crossfit_pools_out_of_fold_scores(tiny_breast_package, breast_bundle,
                                                  tmp_path):
    pkg, ood = _refit(tiny_breast_package, tmp_path, breast_bundle,
                      ood_threshold_scores="crossfit", ood_folds=4)
    n_train, n_calib = len(breast_bundle.splits["train"]), len(breast_bundle.splits["calib"])
    assert ood.threshold_scores == "crossfit" and ood.threshold_fitted_on == "calib+train"
    assert ood.folds == 4 and ood.n_threshold == n_calib + n_train
    # the threshold is the conformal quantile of exactly calib + out-of-fold train scores
    f_train, f_calib, classes = _scores(pkg, breast_bundle)
    full = MahalanobisScorer().fit(f_train, classes)
    oof, _ = crossfit_scores(f_train, classes, 4, seed=0)
    pooled = np.r_[full.score(f_calib), oof]
    assert ood.threshold == pytest.approx(false_alarm_threshold(pooled, 0.05), rel=1e-6)
    assert np.sum(pooled <= ood.threshold) >= math.ceil((len(pooled) + 1) * 0.95)
    assert ood.crossfit_flagged == pytest.approx(np.mean(oof > ood.threshold), abs=1e-9)
    # with the train split's in-sample scores instead (the leak), the threshold would be lower
    leaky = false_alarm_threshold(np.r_[full.score(f_calib), full.score(f_train)], 0.05)
    assert ood.threshold > leaky
    assert load_package(pkg.path).card.ood == ood  # written to the card, manifest still valid


def test_calib_only_option_and_energy_use_calib(tiny_breast_package, breast_bundle, tmp_path):
    pkg, ood = _refit(tiny_breast_package, tmp_path, breast_bundle,
                      ood_threshold_scores="calib")
    n_calib = len(breast_bundle.splits["calib"])
    assert ood.threshold_scores == "calib" and ood.threshold_fitted_on == "calib"
    assert ood.n_threshold == n_calib and ood.n_crossfit is None and ood.folds is None
    _, f_calib, _ = _scores(pkg, breast_bundle)
    scorer = load_model(pkg.path, backend="torch").detector.scorer
    assert ood.threshold == pytest.approx(false_alarm_threshold(scorer.score(f_calib), 0.05))
    # an energy detector keeps working under the default: calib alone
    _, energy = _refit(tiny_breast_package, tmp_path, breast_bundle, ood_detector="energy")
    assert energy.method == "energy" and energy.threshold_scores == "calib"
    assert energy.n_threshold == n_calib and energy.expected_false_alarm is not None


def test_package_from_before_keeps_its_threshold_and_flags(tiny_breast_package, breast_npz,
                                                            tmp_path):
    """A card written before cross-fitting (no threshold_scores, n_threshold …) loads, reads as
    calib-only, and flags exactly the inputs whose score is above its stored threshold."""
    folder = tmp_path / "old"
    shutil.copytree(tiny_breast_package.path, folder)
    card = json.loads((folder / "card.json").read_text())
    old_keys = {"method", "threshold", "false_alarm", "layer", "feature_dim", "file",
                "fitted_on", "threshold_fitted_on", "n_fit", "n_calib", "calib_flagged",
                "shrinkage"}
    card["ood"] = {k: v for k, v in card["ood"].items() if k in old_keys}
    card["ood"].update(threshold_fitted_on="calib", threshold=card["ood"]["threshold"] * 0.9)
    (folder / "card.json").write_text(json.dumps(card))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["card.json"] = sha256_file(folder / "card.json")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    model = load_model(folder, backend="torch")
    spec = model.package.card.ood
    assert spec.threshold_scores == "calib" and spec.n_threshold is None
    rng = np.random.default_rng(1)
    with np.load(breast_npz) as d:
        inputs = list(d["test_images"][:40])
    inputs += [rng.integers(0, 256, (28, 28)).astype(np.uint8) for _ in range(3)]
    preds = model.predict(inputs)
    assert [p.ood for p in preds] == [p.ood_score > spec.threshold for p in preds]
    assert all(p.ood for p in preds[-3:])


def test_report_states_promised_and_realised_false_alarms(tiny_breast_package, breast_bundle,
                                                          tmp_path):
    from scipy.stats import binomtest

    from meddx.evaluation import evaluate

    result = evaluate(tiny_breast_package, split="test", out=tmp_path / "eval", bootstrap=0,
                      subgroups=False, explain=False, update_card=False, bundle=breast_bundle)
    test = breast_bundle.splits["test"]
    predictor = Predictor(tiny_breast_package, backend="torch")
    z, f = predictor.split_outputs(test, features=True)
    flagged = int(np.sum(predictor.ood_scores(z, f) > tiny_breast_package.card.ood.threshold))
    ood = result.ood
    assert ood["n"] == len(test) and ood["flagged"] == flagged
    ci = binomtest(flagged, len(test)).proportion_ci(method="exact")
    assert ood["ci95"] == pytest.approx([ci.low, ci.high])
    assert ood["n_threshold"] == tiny_breast_package.card.ood.n_threshold
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())["ood"]
    assert saved["flagged"] == flagged
    html = (tmp_path / "eval" / "report.html").read_text()
    assert "Inputs unlike the training data (OOD)" in html
    assert f"{flagged} of {len(test)}" in html
