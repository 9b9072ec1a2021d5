"""Rhythm (RR / HRV / morphology) features of a single-lead ECG, on real PhysioNet 2017 records."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from conftest import require_data
from meddx.modalities.ecg.rhythm import FEATURES, detect_beats, features_table, rhythm_features


def _first(folder, label: str, n: int) -> list:
    with (folder / "REFERENCE.csv").open() as f:
        return [folder / r[0] for r in csv.reader(f) if r[1] == label][:n]


@pytest.fixture(scope="module")
def records():
    folder = require_data("ecg/physionet2017")
    return {c: features_table(_first(folder, c, 8), progress=False) for c in ("N", "A")}


def col(x: np.ndarray, name: str) -> np.ndarray:
    return x[:, FEATURES.index(name)]


def test_af_records_are_irregular_and_normal_ones_are_not(records):
    n, a = records["N"], records["A"]
    assert n.shape == (8, len(FEATURES)) and np.isfinite(n).all()
    # an irregularly irregular rhythm: every AF record's successive RR differences exceed
    # every normal record's (8 and 8 of the bundled records, labels from REFERENCE.csv)
    assert col(a, "dd_median_norm").min() > col(n, "dd_median_norm").max()
    assert np.median(col(a, "irregular_frac")) > 0.3 > np.median(col(n, "irregular_frac"))
    # no P wave locked to the QRS in fibrillation
    assert np.median(col(a, "p_wave_ratio")) < np.median(col(n, "p_wave_ratio"))
    assert (col(n, "bsqi") > 0.9).mean() >= 0.75  # the two detectors agree on clean records


def _pulse_train(rr: float, seconds: float = 30.0, fs: float = 300.0) -> np.ndarray:
    t = np.arange(int(seconds * fs)) / fs
    x = np.zeros_like(t)
    for c in np.arange(0.5, seconds - 0.5, rr):
        x += 1.2 * np.exp(-0.5 * ((t - c) / 0.012) ** 2)  # QRS
        x += 0.25 * np.exp(-0.5 * ((t - c - 0.25) / 0.04) ** 2)  # T wave
        x += 0.12 * np.exp(-0.5 * ((t - c + 0.16) / 0.02) ** 2)  # P wave
    return x + np.random.default_rng(0).normal(0, 0.01, t.size)


def test_a_regular_rhythm_gives_its_rate():
    f = dict(zip(FEATURES, rhythm_features(_pulse_train(0.8), 300.0), strict=True))
    assert f["hr_median"] == pytest.approx(75.0, abs=1.0)
    assert f["rr_cv"] < 0.02 and f["irregular_frac"] == 0.0
    assert f["seconds"] == pytest.approx(30.0)
    assert f["bsqi"] > 0.95


@pytest.mark.parametrize("signal", [np.zeros(3000), np.ones(200), np.full(3000, np.nan)])
def test_flat_short_or_broken_signals_give_nan_not_an_error(signal):
    f = rhythm_features(signal, 300.0)
    assert f.shape == (len(FEATURES),)
    assert np.isnan(f[FEATURES.index("rr_cv")])
    assert detect_beats(signal, 300.0).size == 0
