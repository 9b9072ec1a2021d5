"""RR-interval, heart-rate-variability and beat-morphology features of a single-lead ECG.

Most top entries of the PhysioNet/CinC 2017 challenge fused such hand-made rhythm features with
a learnt model: atrial fibrillation is an irregularly irregular RR series without P waves, and
"other rhythm" is often ectopic beats or a pause — information a network sees only indirectly
through its 30-s windows. QRS complexes are found by ``wfdb.processing.xqrs_detect`` (the
PhysioNet toolkit's detector); a second, independent detector gives a signal-quality index (the
fraction of beats both find, bSQI of Li et al. 2008). Li et al. used ``gqrs`` as the second
one; here it is a Pan-Tompkins-style energy detector, fast enough for a whole archive.

Every feature is a number or NaN (too few beats to define it); :data:`FEATURES` names them in
order. The features describe the rhythm and the signal, never the patient.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FEATURES", "PREFIX", "VERSION", "rhythm_features", "detect_beats", "features_table",
           "cached_features", "record_features", "columns"]

logger = logging.getLogger(__name__)

# bump when a feature's definition changes: it keys the on-disk cache of a dataset's features
VERSION = 1
# the features' names as metadata columns and fusion inputs
PREFIX = "rhythm:"

FEATURES = [
    "seconds", "beats_per_s", "hr_median", "rr_mean", "rr_sd", "rr_cv", "rmssd", "rmssd_norm",
    "pnn20", "pnn50", "irregular_frac", "dd_median_norm", "rr_range_norm", "rr_max_norm",
    "rr_min_norm", "sd1_sd2", "dd_entropy", "turning_point_ratio", "bsqi", "template_corr",
    "template_corr_sd", "p_wave_ratio", "qrs_amplitude", "hf_power_frac", "kurtosis",
]


def detect_beats(signal: np.ndarray, fs: float) -> np.ndarray:
    """QRS sample indices (``xqrs``); an empty array where none are found."""
    from wfdb import processing

    x = np.asarray(signal, dtype=np.float64).reshape(-1)
    if x.size < fs * 2 or not np.isfinite(x).all() or np.ptp(x) == 0:
        return np.zeros(0, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            q = processing.xqrs_detect(x, fs=fs, verbose=False)
        except (ValueError, IndexError):  # xqrs fails on flat or very short signals
            return np.zeros(0, dtype=np.int64)
    return np.asarray(q, dtype=np.int64)


def _energy_peaks(xf: np.ndarray, fs: float) -> np.ndarray:
    """A second, independent QRS detector: peaks of the smoothed squared slope (Pan-Tompkins
    style) at least 250 ms apart and above 30% of the median 2-s maximum (robust to a few
    bursts of artefact, which would dominate a global maximum)."""
    from scipy.signal import find_peaks

    e = np.convolve(np.diff(xf, prepend=xf[0]) ** 2, np.ones(max(1, int(0.12 * fs))), "same")
    seg = int(2 * fs)
    n = e.size // seg
    level = np.median(e[:n * seg].reshape(n, seg).max(axis=1)) if n else e.max()
    peaks, _ = find_peaks(e, height=0.3 * level, distance=max(1, int(0.25 * fs)))
    return peaks


def _bsqi(beats: np.ndarray, other: np.ndarray, fs: float) -> float:
    """Fraction of beats both detectors find within 150 ms (matched / union)."""
    if beats.size == 0 or other.size == 0:
        return 0.0
    tol = 0.15 * fs
    j = np.searchsorted(other, beats)
    near = np.minimum(np.abs(beats - other[np.clip(j - 1, 0, other.size - 1)]),
                      np.abs(beats - other[np.clip(j, 0, other.size - 1)]))
    matched = int((near <= tol).sum())
    return matched / (beats.size + other.size - matched)


def _beats_matrix(x: np.ndarray, fs: float, beats: np.ndarray) -> np.ndarray:
    pre, post = int(0.3 * fs), int(0.45 * fs)
    ok = beats[(beats - pre >= 0) & (beats + post < x.size)]
    if ok.size == 0:
        return np.zeros((0, pre + post))
    return np.stack([x[b - pre:b + post] for b in ok])


def rhythm_features(signal: np.ndarray, fs: float) -> np.ndarray:
    """The :data:`FEATURES` of one lead (``signal`` 1-D, physical units) at ``fs`` Hz."""
    from scipy import signal as sps
    from scipy.stats import kurtosis

    x = np.asarray(signal, dtype=np.float64).reshape(-1)
    out = dict.fromkeys(FEATURES, np.nan)
    seconds = x.size / fs
    out["seconds"] = seconds
    if x.size < fs * 2 or not np.isfinite(x).all():
        return np.array([out[k] for k in FEATURES])
    sos = sps.butter(3, [0.5, 40.0], btype="band", fs=fs, output="sos")
    xf = sps.sosfiltfilt(sos, x) if fs > 80.1 else x - np.median(x)
    f, pxx = sps.welch(x - x.mean(), fs=fs, nperseg=min(x.size, int(4 * fs)))
    total = pxx[(f >= 0.5)].sum()
    out["hf_power_frac"] = float(pxx[f >= 40].sum() / total) if total > 0 else np.nan
    out["kurtosis"] = float(kurtosis(xf)) if np.ptp(xf) > 0 else np.nan
    beats = detect_beats(x, fs)
    out["beats_per_s"] = beats.size / seconds
    out["bsqi"] = _bsqi(beats, _energy_peaks(xf, fs), fs)
    if beats.size >= 2:
        # snap each detection to the largest deflection within 50 ms (xqrs marks the onset
        # side), then keep one beat per 250-ms refractory period (the larger one)
        w = max(1, int(0.05 * fs))
        snapped = []
        for b in beats:
            lo, hi = max(0, b - w), min(xf.size, b + w + 1)
            snapped.append(lo + int(np.argmax(np.abs(xf[lo:hi]))))
        kept: list[int] = []
        for b in sorted(set(snapped)):
            if kept and b - kept[-1] < 0.25 * fs:
                if abs(xf[b]) > abs(xf[kept[-1]]):
                    kept[-1] = b
                continue
            kept.append(b)
        beats = np.asarray(kept, dtype=np.int64)
    rr = np.diff(beats) / fs
    if rr.size >= 2:
        med = float(np.median(rr))
        dd = np.diff(rr)
        out.update({
            "hr_median": 60.0 / med, "rr_mean": float(rr.mean()), "rr_sd": float(rr.std()),
            "rr_cv": float(rr.std() / rr.mean()),
            "rmssd": float(np.sqrt(np.mean(dd ** 2))),
            "rmssd_norm": float(np.sqrt(np.mean(dd ** 2)) / rr.mean()),
            "pnn20": float(np.mean(np.abs(dd) > 0.02)), "pnn50": float(np.mean(np.abs(dd) > 0.05)),
            "irregular_frac": float(np.mean(np.abs(dd) > 0.15 * med)),
            "dd_median_norm": float(np.median(np.abs(dd)) / med),
            "rr_range_norm": float((np.percentile(rr, 95) - np.percentile(rr, 5)) / med),
            "rr_max_norm": float(rr.max() / med), "rr_min_norm": float(rr.min() / med),
        })
        sd1 = np.std(dd) / np.sqrt(2)
        sd2 = np.sqrt(max(2 * rr.var() - sd1 ** 2, 1e-12))
        out["sd1_sd2"] = float(sd1 / sd2)
        hist, _ = np.histogram(np.clip(dd / med, -0.5, 0.5), bins=16, range=(-0.5, 0.5))
        p = hist[hist > 0] / hist.sum()
        out["dd_entropy"] = float(-(p * np.log2(p)).sum() / 4.0)
        if rr.size >= 3:
            turns = ((rr[1:-1] - rr[:-2]) * (rr[1:-1] - rr[2:]) > 0).sum()
            out["turning_point_ratio"] = float(turns / (rr.size - 2))
    m = _beats_matrix(xf, fs, beats)
    if len(m) >= 3:
        template = np.median(m, axis=0)
        tc = np.array([np.corrcoef(b, template)[0, 1] if np.ptp(b) > 0 else 0.0 for b in m])
        out["template_corr"] = float(np.nanmean(tc))
        out["template_corr_sd"] = float(np.nanstd(tc))
        pre = int(0.3 * fs)
        qrs = template[pre - int(0.05 * fs):pre + int(0.05 * fs)]
        amp = float(np.ptp(qrs))
        out["qrs_amplitude"] = amp
        # P wave: 300-80 ms before R, in the median beat (averaging keeps a P wave that is
        # locked to the QRS and cancels fibrillatory waves, which are not)
        p_seg = template[:pre - int(0.08 * fs)]
        out["p_wave_ratio"] = float(np.ptp(p_seg) / amp) if amp > 0 else np.nan
    return np.array([out[k] for k in FEATURES], dtype=np.float64)


def features_table(paths: list[Any], progress: bool = True) -> np.ndarray:
    """:func:`rhythm_features` of the first lead of each WFDB record, read one at a time."""
    from tqdm import tqdm

    from meddx.modalities.ecg.io import read_wfdb

    rows = []
    for path in tqdm(paths, desc="rhythm features", unit="rec", disable=not progress,
                     mininterval=2.0):
        rec = read_wfdb(path)
        rows.append(rhythm_features(rec.signal[:, 0], rec.fs))
    return np.stack(rows) if rows else np.zeros((0, len(FEATURES)))


def columns() -> list[str]:
    """The features' names as split metadata columns (``rhythm:rr_cv`` …)."""
    return [PREFIX + f for f in FEATURES]


def record_features(record: Any, leads: list[str] | None = None) -> dict[str, float]:
    """``{"rhythm:<name>": value}`` of an :class:`~meddx.modalities.ecg.io.ECGRecord`, from
    its first lead among ``leads`` (the model's), at the record's own sampling rate."""
    from meddx.modalities.ecg.io import select_leads

    sig = select_leads(record, leads)[0]  # (leads, samples): the first of the model's leads
    return dict(zip(columns(), rhythm_features(sig, record.fs).tolist(), strict=True))


def cached_features(folder: Any, ids: list[str], progress: bool = True) -> np.ndarray:
    """:func:`features_table` of the records ``ids`` of a WFDB folder, one row per id.

    Rows are kept per record in ``cache_dir()/ecg/rhythm-<key>.npz`` (key: the folder,
    :data:`FEATURES` and :data:`VERSION`), so any later subset or split of the same folder
    computes only the records not seen before.
    """
    from meddx.catalog import cache_dir

    folder = Path(folder)
    key = hashlib.sha256(json.dumps([str(folder.resolve()), FEATURES, VERSION]).encode()
                         ).hexdigest()[:16]
    path = cache_dir() / "ecg" / f"rhythm-{key}.npz"
    known: dict[str, np.ndarray] = {}
    if path.is_file():
        try:
            with np.load(path) as got:
                known = dict(zip(got["ids"].tolist(), got["x"], strict=True))
        except (OSError, ValueError, KeyError):  # a damaged cache is rebuilt, never trusted
            logger.warning("rhythm-feature cache %s unreadable: rebuilding it", path.name)
    todo = [i for i in dict.fromkeys(ids) if i not in known]
    if todo:
        logger.info("rhythm features of %d records of %s (cached for later runs)", len(todo),
                    folder.name)
        known.update(zip(todo, features_table([folder / i for i in todo], progress=progress),
                         strict=True))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".npz", dir=path.parent)
        os.close(fd)
        names = sorted(known)
        np.savez(tmp, ids=np.array(names), x=np.stack([known[n] for n in names]))
        os.replace(tmp, path)
    return np.stack([known[i] for i in ids]) if ids else np.zeros((0, len(FEATURES)))
