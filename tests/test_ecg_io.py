"""ECG readers and preprocessing on the bundled WFDB records: formats, resampling, windows,
beat segmentation (MIT-BIH 100) and every bad input the issue names."""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import require_data
from meddx.errors import DataError, InputMismatchError
from meddx.modalities.ecg.io import (
    fit_length,
    from_array,
    preprocess,
    read_csv,
    read_wfdb,
    read_wfdb_upload,
    resample,
    segment_beats,
    windows,
)

SPEC = {"leads": ["ECG"], "fs": 150.0, "length": 1500, "stride": 750, "min_seconds": 5.0}


@pytest.fixture(scope="module")
def p17() -> Path:
    return require_data("ecg/physionet2017")


@pytest.fixture(scope="module")
def wfdb_dir() -> Path:
    return require_data("ecg/wfdb")


def test_physionet2017_mat_and_hea_read_the_same_record(p17: Path) -> None:
    a = read_wfdb(p17 / "A00005.hea")
    b = read_wfdb(p17 / "A00005.mat")
    assert a.fs == 300 and a.leads == ["ECG"] and a.signal.shape == (18000, 1)
    np.testing.assert_array_equal(a.signal, b.signal)
    # physical = (digital - baseline) / gain, as wfdb defines it
    np.testing.assert_allclose(a.signal[:, 0], (a.digital[:, 0] - a.baseline[0]) / a.gain[0])


def test_multilead_records_in_other_formats(wfdb_dir: Path) -> None:
    mit = read_wfdb(wfdb_dir / "100.hea")  # format 212
    assert mit.leads == ["MLII", "V5"] and mit.fs == 360 and mit.n_samples == 650000
    ptb = read_wfdb(wfdb_dir / "s0010_re")  # format 16, two signal files
    assert len(ptb.leads) == 15 and ptb.fs == 1000


def test_preprocess_selects_orders_resamples_and_zscores(wfdb_dir: Path) -> None:
    full = read_wfdb(wfdb_dir / "100.hea")
    rec = dataclasses.replace(full, signal=full.signal[:21600], digital=None)  # first minute
    sig = preprocess(rec, {"leads": ["v5", "MLII"], "fs": 125.0, "min_seconds": 1})
    assert sig.shape == (2, 7500) and sig.dtype == np.float32
    np.testing.assert_allclose(sig.mean(axis=1), 0, atol=1e-4)
    np.testing.assert_allclose(sig.std(axis=1), 1, atol=1e-3)
    # first row is V5: it correlates with the resampled V5, not with MLII
    v5 = resample(rec.signal[:, 1], 360, 125)
    assert np.corrcoef(sig[0], v5)[0, 1] > 0.999


def test_resample_keeps_a_slow_sine() -> None:
    t = np.arange(3000) / 300
    x = np.sin(2 * np.pi * 1.0 * t)
    y = resample(x, 300, 150)
    assert y.shape == (1500,)
    np.testing.assert_allclose(y[50:-50], np.sin(2 * np.pi * np.arange(1500) / 150)[50:-50],
                               atol=1e-2)


def test_windows_cover_the_whole_record_and_pad_short_ones() -> None:
    sig = np.arange(2 * 1000, dtype=np.float32).reshape(2, 1000)
    wins, starts = windows(sig, 300, 150)
    assert wins.shape == (len(starts), 2, 300) and starts[-1] == 700
    np.testing.assert_array_equal(wins[-1], sig[:, -300:])
    one, s = windows(sig[:, :100], 300, 150)
    assert one.shape == (1, 2, 300) and s == [0]
    np.testing.assert_array_equal(fit_length(sig[:, :100], 300)[:, 100:200], sig[:, :100])


def test_csv_with_stated_rate(tmp_path: Path, p17: Path) -> None:
    rec = read_wfdb(p17 / "A00005.hea")
    f = tmp_path / "ecg.csv"
    rows = "\n".join(f"{i / 300:.5f},{v:.6f}" for i, v in enumerate(rec.signal[:, 0]))
    f.write_text("# fs=300\ntime,ECG\n" + rows + "\n")
    csv = read_csv(f)
    assert csv.fs == 300 and csv.leads == ["ECG"]
    np.testing.assert_allclose(csv.signal[:, 0], rec.signal[:, 0], atol=1e-6)
    assert read_csv(f, fs=250).fs == 250  # an explicit rate wins


def test_upload_of_header_and_signal_bytes(p17: Path) -> None:
    files = {"A00005.hea": (p17 / "A00005.hea").read_bytes(),
             "A00005.mat": (p17 / "A00005.mat").read_bytes()}
    rec = read_wfdb_upload(files)
    np.testing.assert_array_equal(rec.signal, read_wfdb(p17 / "A00005.hea").signal)
    with pytest.raises(DataError, match="plain file name"):
        read_wfdb_upload({"A00005.hea": files["A00005.hea"], "../x.mat": b""})


# ----------------------------------------------------------------------------- bad inputs
def test_header_naming_a_missing_signal_file(tmp_path: Path, p17: Path) -> None:
    shutil.copy(p17 / "A00005.hea", tmp_path / "A00005.hea")
    with pytest.raises(DataError, match=r"A00005\.mat.*missing"):
        read_wfdb(tmp_path / "A00005.hea")
    with pytest.raises(DataError, match="missing"):
        read_wfdb_upload({"A00005.hea": (p17 / "A00005.hea").read_bytes()})


def test_sampling_rate_absent(tmp_path: Path, p17: Path) -> None:
    lines = (p17 / "A00005.hea").read_text().splitlines()
    (tmp_path / "A00005.hea").write_text("A00005 1\n" + "\n".join(lines[1:]) + "\n")
    shutil.copy(p17 / "A00005.mat", tmp_path / "A00005.mat")
    with pytest.raises(DataError, match="no sampling rate"):
        read_wfdb(tmp_path / "A00005.hea")
    csv = tmp_path / "x.csv"
    csv.write_text("ECG\n0.1\n0.2\n")
    with pytest.raises(DataError, match="no sampling rate"):
        read_csv(csv)
    with pytest.raises(DataError, match="no sampling rate"):
        from_array(np.zeros((1, 3000)), None)


def test_nan_samples_are_refused(tmp_path: Path) -> None:
    import wfdb

    sig = np.sin(np.linspace(0, 60, 3000))[:, None]
    sig[100:110] = np.nan
    wfdb.wrsamp("gap", fs=300, units=["mV"], sig_name=["ECG"], p_signal=sig, fmt=["16"],
                write_dir=str(tmp_path))
    rec = read_wfdb(tmp_path / "gap.hea")
    assert np.isnan(rec.signal).sum() == 10
    with pytest.raises(DataError, match="NaN") as err:
        preprocess(rec, SPEC)
    assert err.value.context["sample_id"] == "gap"


def test_a_needed_lead_missing(wfdb_dir: Path) -> None:
    rec = read_wfdb(wfdb_dir / "100.hea")
    with pytest.raises(InputMismatchError, match=r"lead\(s\) \['V1'\]"):
        preprocess(rec, {"leads": ["MLII", "V1"], "fs": 360})


def test_record_shorter_than_the_minimum() -> None:
    rec = from_array(np.random.default_rng(0).normal(size=(1, 600)), fs=300, leads=["ECG"])
    with pytest.raises(InputMismatchError, match="shorter than the 5 s minimum"):
        preprocess(rec, SPEC)


def test_array_orientation_is_not_guessed() -> None:
    with pytest.raises(InputMismatchError, match="transpose"):
        from_array(np.zeros((3000, 1)), fs=300)


# ------------------------------------------------------------------------ MIT-BIH beats
def test_mitbih_100_beat_segmentation_matches_the_annotation_counts(wfdb_dir: Path) -> None:
    beats, symbols = segment_beats(wfdb_dir / "100.hea", window_s=0.6)
    counts = Counter(symbols)
    assert counts == {"N": 2239, "A": 33, "V": 1}  # DATA.md; the '+' rhythm mark is no beat
    assert beats.shape == (2273, 2, 216)  # 0.6 s at 360 Hz, both leads
    # windows are centred on the R peak: the mean normal beat (MLII) peaks at the centre
    normal = beats[[i for i, s in enumerate(symbols) if s == "N"], 0]
    assert abs(int(np.argmax(normal.mean(axis=0))) - 108) <= 5
    mlii, sym2 = segment_beats(wfdb_dir / "100", window_s=0.6, leads=["MLII"])
    assert mlii.shape == (2273, 1, 216) and sym2 == symbols
