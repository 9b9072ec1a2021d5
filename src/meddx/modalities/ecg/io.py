"""ECG readers and preprocessing, thin over ``wfdb`` and ``scipy.signal``.

Readers turn every supported source into an :class:`ECGRecord` (samples × leads in physical
units, the sampling rate, lead names, and the ADC values where the source has them):

* WFDB records (``.hea`` + ``.dat``/``.mat``/any format ``wfdb`` reads, multi-lead),
  PhysioNet 2017 ``.mat`` + ``.hea`` included (:func:`read_wfdb`);
* uploaded WFDB files as ``{"name.hea": bytes, "name.mat": bytes}`` (:func:`read_wfdb_upload`);
* a CSV of samples with a stated rate (:func:`read_csv`);
* an array (leads × samples) with its rate (:func:`from_array`).

Preprocessing (:func:`preprocess`) is one function shared by training (the cached dataset)
and prediction (``ECGModality.read``): select and order leads by name, refuse NaN samples,
resample to the model's rate (polyphase, anti-aliased), refuse records shorter than the
minimum, z-score each lead over the whole record. :func:`windows` cuts a record into the
fixed-length windows the network takes. :func:`segment_beats` cuts beats around annotated
R peaks (MIT-BIH style ``.atr`` files).
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from meddx.errors import DataError, InputMismatchError

__all__ = [
    "ECGRecord",
    "read_wfdb",
    "read_wfdb_upload",
    "read_csv",
    "from_array",
    "select_leads",
    "resample",
    "zscore",
    "preprocess",
    "fit_length",
    "windows",
    "segment_beats",
    "BEAT_SYMBOLS",
]

logger = logging.getLogger(__name__)

_WFDB_SUFFIXES = {".hea", ".mat", ".dat"}
_TIME_COLUMNS = {"time", "t", "time_s", "seconds", "sample", "index"}
# annotation symbols that mark a beat (wfdb's ann_label_table, "is beat" rows)
BEAT_SYMBOLS = frozenset("NLRBAaJSVrFejnE/fQ?")


@dataclass
class ECGRecord:
    """One ECG recording.

    Attributes:
        id: record name (never a patient identifier).
        signal: physical values, shape (samples, leads), float64.
        fs: sampling rate in Hz.
        leads: lead names, one per column.
        units: physical unit per lead (``mV`` …).
        digital: ADC values (samples, leads) where the source has them (WFDB), else None.
        gain: ADC units per physical unit, per lead (with ``digital``).
        baseline: ADC value of physical zero, per lead (with ``digital``).
    """

    id: str
    signal: np.ndarray
    fs: float
    leads: list[str]
    units: list[str] = field(default_factory=list)
    digital: np.ndarray | None = None
    gain: list[float] | None = None
    baseline: list[int] | None = None

    @property
    def n_samples(self) -> int:
        return int(self.signal.shape[0])

    @property
    def seconds(self) -> float:
        return self.n_samples / self.fs


# ------------------------------------------------------------------------- readers
def _record_base(path: Path) -> Path:
    return path.with_suffix("") if path.suffix.lower() in _WFDB_SUFFIXES else path


def _is_file(path: Path) -> bool:
    """``path.is_file()``, with a path the system refuses (too long, NUL byte) a DataError."""
    try:
        return path.is_file()
    except (OSError, ValueError) as e:
        raise DataError(f"not a usable file path: {type(e).__name__}",
                        path=str(path)[:120]) from e


MAX_HEADER_LINE = 1024  # characters; record and signal lines are well under 200


def _check_header(header: Path) -> None:
    """Refuse a header whose record line states no sampling rate (wfdb would assume 250 Hz),
    or with a record/signal line so long that wfdb's line patterns take seconds to fail on it
    (a 20,000-character line: 6 s)."""
    lines = header.read_text(errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        if len(line) > MAX_HEADER_LINE and not line.lstrip().startswith("#"):
            raise DataError(f"WFDB header line {number} is {len(line):,} characters long; "
                            f"record and signal lines are under {MAX_HEADER_LINE}",
                            path=str(header), hint="the header is corrupt")
    for line in lines:
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.split()
        if len(fields) < 3 or not re.match(r"^[0-9.eE+-]+", fields[2]):
            raise DataError(
                "WFDB header states no sampling rate",
                path=str(header),
                hint="the record line must read '<name> <n_signals> <fs> <n_samples>'",
            )
        return
    raise DataError("WFDB header has no record line", path=str(header))


def read_wfdb(path: str | Path) -> ECGRecord:
    """Read a WFDB record (``x.hea``, ``x.mat``, ``x.dat`` or the record name ``x``).

    Raises:
        DataError: header missing or without a sampling rate, a signal file it names missing,
            or a file ``wfdb`` cannot parse.
    """
    import wfdb

    base = _record_base(Path(path))
    header = base.with_suffix(".hea")
    if not _is_file(header):
        raise DataError("WFDB header not found", path=str(header),
                        hint="give the .hea file; its signal file(s) must sit beside it")
    _check_header(header)
    try:
        rec = wfdb.rdrecord(str(base), physical=False)
        if rec.d_signal is None or rec.d_signal.size == 0:
            raise DataError("WFDB record has no samples", path=str(header))
        physical = rec.dac(expanded=False, return_res=64)  # a bad format code fails here
    except DataError:
        raise
    except FileNotFoundError as e:
        missing = Path(e.filename).name if getattr(e, "filename", None) else "a signal file"
        raise DataError(f"WFDB header names signal file {missing}, which is missing",
                        path=str(header), hint="put the signal file beside the header") from e
    except Exception as e:  # wfdb raises bare ValueError/IndexError/KeyError on malformed files
        raise DataError(f"cannot read WFDB record: {type(e).__name__}: {e}",
                        path=str(header)) from e
    return ECGRecord(
        id=base.name,
        signal=np.asarray(physical, dtype=np.float64),
        fs=float(rec.fs),
        leads=[str(n) for n in rec.sig_name],
        units=[str(u) for u in (rec.units or ["mV"] * len(rec.sig_name))],
        digital=np.asarray(rec.d_signal),
        gain=[float(g) for g in rec.adc_gain],
        baseline=[int(b) for b in rec.baseline],
    )


def read_wfdb_upload(files: dict[str, bytes]) -> ECGRecord:
    """Read uploaded WFDB files ``{"A00005.hea": b"…", "A00005.mat": b"…"}``.

    The files are written to a private temporary folder (only base names are used, so an
    upload cannot write elsewhere) and read with :func:`read_wfdb`.
    """
    headers = [n for n in files if n.lower().endswith(".hea")]
    if len(headers) != 1:
        raise DataError(f"a WFDB upload needs exactly one .hea file, got {len(headers)}",
                        hint="upload the header and its signal file(s)")
    with tempfile.TemporaryDirectory(prefix="meddx-ecg-") as tmp:
        for name, content in files.items():
            safe = Path(name).name
            if safe != name or safe.startswith("."):
                raise DataError(f"uploaded file name {name!r} is not a plain file name")
            if not isinstance(content, bytes | bytearray):
                raise DataError(f"uploaded file {name} must be bytes")
            (Path(tmp) / safe).write_bytes(bytes(content))
        return read_wfdb(Path(tmp) / headers[0])


def _csv_fs_comment(path: Path) -> float | None:
    with path.open(errors="replace") as f:
        for line in f:
            if not line.startswith("#"):
                return None
            m = re.search(r"\bfs\s*[:=]\s*([0-9.]+)", line, flags=re.I)
            if m:
                return check_fs(m.group(1), path.stem)
    return None


def read_csv(path: str | Path, fs: float | None = None) -> ECGRecord:
    """Read a CSV of samples: one column per lead (header row with lead names optional).

    The rate is ``fs`` or a leading comment line ``# fs=300``; a column called ``time`` is
    ignored. Raises DataError when no rate is stated or a value is not a number.
    """
    import pandas as pd

    p = Path(path)
    if not _is_file(p):
        raise DataError("CSV file not found", path=str(p))
    fs = fs or _csv_fs_comment(p)
    if not fs:
        raise DataError("CSV states no sampling rate", path=str(p),
                        hint="pass the rate (fs=…) or start the file with a line '# fs=300'")
    first = next((ln for ln in p.read_text(errors="replace").splitlines()
                  if ln.strip() and not ln.startswith("#")), "")
    has_header = any(re.search(r"[A-Za-z]", c) for c in first.split(","))
    try:
        df = pd.read_csv(p, comment="#", header=0 if has_header else None)
    except Exception as e:
        raise DataError(f"cannot parse CSV: {e}", path=str(p)) from e
    if not has_header:
        df.columns = [f"lead{i + 1}" for i in range(df.shape[1])]
    df = df[[c for c in df.columns if str(c).strip().lower() not in _TIME_COLUMNS]]
    try:
        values = df.to_numpy(dtype=np.float64)
    except ValueError as e:
        raise DataError(f"CSV holds values that are not numbers: {e}", path=str(p)) from e
    return ECGRecord(id=p.stem, signal=values, fs=float(fs),
                     leads=[str(c).strip() for c in df.columns], units=["mV"] * df.shape[1])


def from_array(array: Any, fs: float | None, leads: list[str] | None = None,
               record_id: str = "array") -> ECGRecord:
    """An array of shape (leads, samples) (or (samples,) for one lead) at rate ``fs``."""
    try:
        a = np.asarray(array, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"ECG data is not an array of numbers ({type(e).__name__})",
                        sample_id=record_id, hint="give (leads, samples) numbers") from e
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise InputMismatchError(f"an ECG array must be (leads, samples), got shape {a.shape}",
                                 sample_id=record_id)
    if a.shape[0] > a.shape[1]:
        raise InputMismatchError(
            f"ECG array of shape {a.shape} has more leads than samples",
            sample_id=record_id, hint="arrays are (leads, samples): transpose it")
    if not fs:
        raise DataError("ECG array has no sampling rate", sample_id=record_id,
                        hint="give fs with the array")
    fs = check_fs(fs, record_id)
    names = leads or [f"lead{i + 1}" for i in range(a.shape[0])]
    if len(names) != a.shape[0]:
        raise InputMismatchError(f"{len(names)} lead names for {a.shape[0]} leads",
                                 sample_id=record_id)
    return ECGRecord(id=record_id, signal=a.T.copy(), fs=float(fs), leads=list(names),
                     units=["mV"] * a.shape[0])


# ------------------------------------------------------------------- preprocessing
def select_leads(record: ECGRecord, leads: list[str] | None) -> np.ndarray:
    """The record's leads in the model's order, as (leads, samples).

    Names match case-insensitively. A single-lead model takes a single-lead record whatever
    its lead is called (PhysioNet 2017 names it ``ECG``, a Holter ``MLII``); otherwise every
    lead the model needs must be present.

    Raises:
        InputMismatchError: a needed lead is missing.
    """
    sig = record.signal.T
    if not leads:
        return sig
    have = {name.lower(): i for i, name in enumerate(record.leads)}
    if all(name.lower() in have for name in leads):
        return sig[[have[name.lower()] for name in leads]]
    if len(leads) == 1 and len(record.leads) == 1:
        return sig
    missing = [name for name in leads if name.lower() not in have]
    raise InputMismatchError(
        f"the model needs lead(s) {missing}, which the record lacks",
        sample_id=record.id,
        hint=f"the record has leads {record.leads}; the model was trained on {leads}",
    )


FS_RANGE = (1.0, 100_000.0)  # Hz; anything outside is not an ECG sampling rate
MAX_RESAMPLED = 20_000_000  # samples per lead after resampling (a day at 200 Hz)


def check_fs(fs: Any, record_id: str = "record") -> float:
    """A sampling rate as a float inside :data:`FS_RANGE`, else a DataError naming it."""
    try:
        value = float(fs)
    except (TypeError, ValueError, OverflowError) as e:
        raise DataError(f"sampling rate {str(fs)[:40]!r} is not a number",
                        sample_id=record_id) from e
    if not FS_RANGE[0] <= value <= FS_RANGE[1]:  # also False for NaN
        raise DataError(f"sampling rate {value:g} Hz is outside {FS_RANGE[0]:g}-"
                        f"{FS_RANGE[1]:g} Hz", sample_id=record_id,
                        hint="check the header's or the request's sampling rate")
    return value


def resample(signal: np.ndarray, fs_in: float, fs_out: float) -> np.ndarray:
    """Polyphase resampling (``scipy.signal.resample_poly``) along the last axis."""
    if abs(fs_in - fs_out) < 1e-9:
        return signal
    from scipy.signal import resample_poly

    ratio = Fraction(fs_out / fs_in).limit_denominator(1000)
    return resample_poly(signal, ratio.numerator, ratio.denominator, axis=-1)


def zscore(signal: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Per-lead z-score over the whole record (a flat lead becomes zeros)."""
    mean = signal.mean(axis=-1, keepdims=True)
    std = signal.std(axis=-1, keepdims=True)
    return (signal - mean) / np.maximum(std, eps)


def preprocess(record: ECGRecord, spec: dict[str, Any]) -> np.ndarray:
    """Record → model-ready (leads, samples) float32 at ``spec["fs"]``, z-scored per lead.

    Raises:
        DataError: NaN samples. InputMismatchError: a needed lead is missing, or the record is
            shorter than ``spec["min_seconds"]``.
    """
    sig = select_leads(record, spec.get("leads"))
    bad = ~np.isfinite(sig)
    if bad.any():
        leads = spec.get("leads") or record.leads
        which = sorted({leads[i] if i < len(leads) else str(i) for i in np.where(bad)[0]})
        raise DataError(f"record has {int(bad.sum())} missing (NaN) samples in lead(s) {which}",
                        sample_id=record.id, hint="repair or crop the record before predicting")
    fs = float(spec.get("fs") or record.fs)
    fs_in = check_fs(record.fs, record.id)
    if sig.shape[-1] * fs / fs_in > MAX_RESAMPLED:
        raise DataError(f"record of {sig.shape[-1]:,} samples at {fs_in:g} Hz is too long "
                        f"({sig.shape[-1] / fs_in / 3600:.1f} h)", sample_id=record.id,
                        hint="crop it to the stretch to assess")
    sig = resample(sig, fs_in, fs)
    min_seconds = float(spec.get("min_seconds", 0))
    if sig.shape[-1] < max(1, round(min_seconds * fs)):
        raise InputMismatchError(
            f"record lasts {record.seconds:.1f} s, shorter than the {min_seconds:g} s minimum",
            sample_id=record.id, hint="give a longer recording")
    if spec.get("normalize", "zscore") == "zscore":
        sig = zscore(sig)
    return np.ascontiguousarray(sig, dtype=np.float32)


def fit_length(signal: np.ndarray, length: int, start: int | None = None) -> np.ndarray:
    """Crop or zero-pad the last axis to ``length``; centred unless ``start`` is given
    (for crops: the first sample kept; for pads: where the record begins)."""
    n = signal.shape[-1]
    if n == length:
        return signal
    if n > length:
        s = (n - length) // 2 if start is None else start
        return signal[..., s:s + length]
    pad = (length - n) // 2 if start is None else start
    out = np.zeros((*signal.shape[:-1], length), dtype=signal.dtype)
    out[..., pad:pad + n] = signal
    return out


def windows(signal: np.ndarray, length: int, stride: int) -> tuple[np.ndarray, list[int]]:
    """Cut (leads, samples) into windows (n_windows, leads, length), the last one aligned to
    the record's end so no sample is left out; a short record gives one padded window."""
    n = signal.shape[-1]
    if n <= length:
        return fit_length(signal, length)[None], [0]
    starts = list(range(0, n - length + 1, max(1, stride)))
    if starts[-1] != n - length:
        starts.append(n - length)
    return np.stack([signal[:, s:s + length] for s in starts]), starts


# ------------------------------------------------------------------------- beats
def segment_beats(record_path: str | Path, window_s: float = 0.6, extension: str = "atr",
                  leads: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Cut beats centred on the annotated R peaks of a WFDB record.

    Args:
        record_path: the record (``100``, ``100.hea`` or ``100.dat``); its annotation file
            ``<record>.<extension>`` must sit beside it.
        window_s: window length in seconds, centred on each R peak; beats too close to either
            end are zero-padded so every annotated beat is returned.
        extension: annotation file extension.
        leads: leads to keep (default all).

    Returns:
        (beats of shape (n_beats, leads, samples) in physical units, beat symbols).
    """
    import wfdb

    base = _record_base(Path(record_path))
    ann_path = base.with_suffix(f".{extension}")
    if not ann_path.is_file():
        raise DataError("annotation file not found", path=str(ann_path))
    record = read_wfdb(base)
    try:
        ann = wfdb.rdann(str(base), extension)
    except Exception as e:
        raise DataError(f"cannot read annotations: {e}", path=str(ann_path)) from e
    sig = select_leads(record, leads)
    half = max(1, round(window_s * record.fs / 2))
    padded = np.pad(sig, ((0, 0), (half, half)))
    keep = [(int(s), sym) for s, sym in zip(ann.sample, ann.symbol, strict=True)
            if sym in BEAT_SYMBOLS and 0 <= s < record.n_samples]
    if not keep:
        return np.zeros((0, sig.shape[0], 2 * half), dtype=np.float32), []
    beats = np.stack([padded[:, s:s + 2 * half] for s, _ in keep]).astype(np.float32)
    return beats, [sym for _, sym in keep]
