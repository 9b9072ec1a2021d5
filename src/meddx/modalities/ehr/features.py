"""GRU-D inputs from ICU stays: hourly bins, masks, time since last observation, statics.

One stay becomes a float32 tensor ``(C, T)`` with ``T = 48`` hourly bins and channels laid
out as (see :func:`layout`)::

    values  V   standardised value per variable (train-set mean/std, log scale for skewed labs);
                0 where not observed
    masks   V   1 where the variable was observed in the bin
    deltas  V   hours since the variable was last observed (GRU-D's δ), divided by 48
    static  S   age (z), male, female, height (z), height observed, ICU type one-hot (4)
    valid   1   1 for the bins inside the prediction window (the hours used)

Bin ``k`` holds observations at ``k·60 ≤ minutes < (k+1)·60`` (48:00 goes into the last bin);
several values in one bin combine as the mapping table says (last value; urine: sum).
The window covers ``hours_used`` bins: up to the prediction time when the source states one,
else up to the bin of the last observation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meddx.errors import DataError
from meddx.modalities.ehr.io import (
    Issue,
    OnMalformed,
    Stay,
    count_dropped,
    mapping_table_sha256,
    read_physionet_stay,
    series_variables,
    variables,
)

__all__ = [
    "FEATURE_VERSION",
    "BINS",
    "STATIC_NAMES",
    "layout",
    "Binned",
    "bin_stay",
    "fit_stats",
    "encode",
    "truncate",
    "featurize_files",
    "cached_features",
    "decode_values",
    "describe_variable",
]

logger = logging.getLogger(__name__)

FEATURE_VERSION = 1
#: format of the feature cache (2: issues carry reason codes, per-record dropped-line counts)
CACHE_VERSION = 2
BINS = 48
STATIC_NAMES = ["age", "male", "female", "height", "height_observed",
                "icu_coronary", "icu_cardiac_surgery", "icu_medical", "icu_surgical"]
_CLIP = 8.0


def layout(n_vars: int, n_static: int = len(STATIC_NAMES)) -> dict[str, list[int]]:
    """Channel ranges ``[start, stop)`` of each block."""
    v, s = n_vars, n_static
    return {"values": [0, v], "masks": [v, 2 * v], "deltas": [2 * v, 3 * v],
            "static": [3 * v, 3 * v + s], "valid": [3 * v + s, 3 * v + s + 1]}


def _window_bins(stay: Stay, bins: int) -> tuple[int, float]:
    """(hours used, window end in minutes) for a stay."""
    limit = bins * 60.0
    if stay.prediction_minutes is not None:
        end = min(stay.prediction_minutes, limit)
    else:
        inside = [m for m, _, _ in stay.events if 0 <= m <= limit]
        end = max(inside) if inside else 0.0
    return min(bins, int(end // 60) + 1), end


@dataclass
class Binned:
    """A stay in hourly bins.

    Attributes:
        values: raw values ``(V, T)`` in PhysioNet units (NaN: not observed).
        static: raw statics ``(4,)``: age, sex (1 male, 0 female), height, ICU type (NaN missing).
        hours: hours used (bins inside the window).
        outside: events left out because they fall outside the window (listed, never dropped
            silently).
        used: indices into ``stay.events`` of the events that were binned.
    """

    values: np.ndarray
    static: np.ndarray
    hours: int
    outside: list[Issue]
    used: list[int]


def bin_stay(stay: Stay, bins: int = BINS) -> Binned:
    """A stay → :class:`Binned` (hourly values, statics, hours used, events left out).

    Raises:
        DataError: no observation at all inside the window ("cannot assess").
    """
    names = series_variables()
    index = {n: i for i, n in enumerate(names)}
    table = variables()
    hours, end = _window_bins(stay, bins)
    values = np.full((len(names), bins), np.nan, dtype=np.float64)
    outside: list[Issue] = []
    used: list[int] = []
    order = sorted(range(len(stay.events)), key=lambda i: stay.events[i][0])
    for i in order:
        minutes, name, value = stay.events[i]
        if minutes < 0 or minutes > end:
            when = "before ICU admission" if minutes < 0 else (
                "after the prediction time" if minutes <= bins * 60 else
                f"after the first {bins} h")
            outside.append(Issue(stay.record_id, None, f"outside the window: {when}",
                                 f"{name} at {minutes / 60:.2f} h", "out_of_window"))
            continue
        b, v = min(int(minutes // 60), bins - 1), index[name]
        agg = table[name].aggregate
        old = values[v, b]
        if agg == "sum" and not math.isnan(old):
            values[v, b] = old + value
        elif agg == "max" and not math.isnan(old):
            values[v, b] = max(old, value)
        else:
            values[v, b] = value
        used.append(i)
    if not used:
        raise DataError(
            "cannot assess: the stay has no observations inside the prediction window",
            hint="a risk needs at least one vital sign or laboratory value after ICU admission; "
            "this is not a low risk",
            sample_id=stay.record_id,
        )
    sex = {"male": 1.0, "female": 0.0}.get(stay.sex or "", np.nan)
    static = np.array([_nan(stay.age), sex, _nan(stay.height), _nan(stay.icu_type)])
    return Binned(values, static, hours, outside, used)


def _nan(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def _transform(values: np.ndarray, names: list[str]) -> np.ndarray:
    """Log scale for skewed variables (``log`` column of the mapping table)."""
    out = values.astype(np.float64, copy=True)
    table = variables()
    for i, n in enumerate(names):
        if table[n].log:
            out[..., i, :] = np.log1p(np.maximum(out[..., i, :], 0.0))
    return out


def fit_stats(values: np.ndarray, static: np.ndarray) -> dict[str, Any]:
    """Train-set normalisation statistics (stored in ``input_spec["stats"]``).

    Args:
        values: raw values ``(N, V, T)`` (NaN where not observed).
        static: raw statics ``(N, 4)``.
    """
    names = series_variables()
    t = _transform(values, names)
    series = {}
    for i, n in enumerate(names):
        x = t[:, i, :]
        x = x[~np.isnan(x)]
        mean = float(x.mean()) if x.size else 0.0
        std = float(x.std()) if x.size > 1 else 1.0
        series[n] = [mean, std if std > 1e-6 else 1.0]

    def ms(col: np.ndarray) -> list[float]:
        col = col[~np.isnan(col)]
        return [float(col.mean()), float(col.std()) or 1.0] if col.size else [0.0, 1.0]

    return {"series": series, "age": ms(static[:, 0]), "height": ms(static[:, 2])}


def _deltas(mask: np.ndarray) -> np.ndarray:
    """GRU-D δ in hours: time since the variable was last observed (0 at the first bin)."""
    delta = np.zeros(mask.shape, dtype=np.float32)
    for t in range(1, mask.shape[-1]):
        delta[..., t] = np.where(mask[..., t - 1] > 0, 1.0, 1.0 + delta[..., t - 1])
    return delta


def encode(values: np.ndarray, static: np.ndarray, hours: np.ndarray | int,
           stats: Mapping[str, Any]) -> np.ndarray:
    """Raw arrays → model tensors ``(N, C, T)`` float32 (or ``(C, T)`` for one stay)."""
    single = values.ndim == 2
    if single:
        values, static = values[None], static[None]
    n, v, t = values.shape
    hours = np.broadcast_to(np.asarray(hours, dtype=int), (n,))
    names = series_variables()
    mean = np.array([stats["series"][k][0] for k in names])[None, :, None]
    std = np.array([stats["series"][k][1] for k in names])[None, :, None]
    valid = (np.arange(t)[None, :] < hours[:, None]).astype(np.float32)  # (N, T)
    z = (_transform(values, names) - mean) / std
    mask = (~np.isnan(z)) & (valid[:, None, :] > 0)
    z = np.where(mask, np.clip(z, -_CLIP, _CLIP), 0.0)
    delta = _deltas(mask.astype(np.float32)) / BINS * valid[:, None, :]
    out = np.zeros((n, 3 * v + len(STATIC_NAMES) + 1, t), dtype=np.float32)
    out[:, :v] = z
    out[:, v:2 * v] = mask
    out[:, 2 * v:3 * v] = delta
    out[:, 3 * v:3 * v + len(STATIC_NAMES)] = _encode_static(static, stats)[:, :, None]
    out[:, -1] = valid
    return out[0] if single else out


def _encode_static(static: np.ndarray, stats: Mapping[str, Any]) -> np.ndarray:
    n = static.shape[0]
    s = np.zeros((n, len(STATIC_NAMES)), dtype=np.float64)
    age_m, age_s = stats["age"]
    h_m, h_s = stats["height"]
    s[:, 0] = np.nan_to_num((static[:, 0] - age_m) / age_s, nan=0.0)
    s[:, 1] = static[:, 1] == 1
    s[:, 2] = static[:, 1] == 0
    has_h = ~np.isnan(static[:, 2])
    s[:, 3] = np.where(has_h, np.clip((np.nan_to_num(static[:, 2]) - h_m) / h_s, -_CLIP, _CLIP), 0)
    s[:, 4] = has_h
    for k in range(4):
        s[:, 5 + k] = static[:, 3] == k + 1
    return s


def truncate(x: Any, hours: int, spec_layout: Mapping[str, list[int]]) -> Any:
    """Keep only the first ``hours`` bins of an encoded tensor (same as encoding with fewer
    hours): values, masks and deltas after them become 0 and ``valid`` 0. Works on numpy
    arrays and torch tensors, ``(C, T)`` or ``(N, C, T)``."""
    out = x.clone() if hasattr(x, "clone") else x.copy()
    lo, hi = spec_layout["values"][0], spec_layout["deltas"][1]
    valid = spec_layout["valid"][0]
    out[..., lo:hi, hours:] = 0
    out[..., valid, hours:] = 0
    return out


def decode_values(x: np.ndarray, stats: Mapping[str, Any]) -> np.ndarray:
    """Encoded tensor ``(C, T)`` → raw values ``(V, T)`` in PhysioNet units (NaN unobserved)."""
    names = series_variables()
    v = len(names)
    out = np.full((v, x.shape[-1]), np.nan)
    table = variables()
    for i, n in enumerate(names):
        m, s = stats["series"][n]
        seen = x[v + i] > 0
        raw = x[i][seen] * s + m
        out[i, seen] = np.expm1(raw) if table[n].log else raw
    return out


# --------------------------------------------------------------------------- dataset cache
def featurize_files(files: Mapping[str, Path], on_malformed: OnMalformed = "warn",
                    progress: bool = True) -> dict[str, Any]:
    """Read and bin every stay file: ``record_ids``, ``values (N,V,T)``, ``static (N,4)``,
    ``hours (N,)``, ``issues`` (dicts), ``empty`` (records with no observations) and
    ``dropped`` (record → lines left out by reason, for every record with any)."""
    from tqdm import tqdm

    ids, vals, stats_, hours, issues, empty = [], [], [], [], [], []
    dropped: dict[str, dict[str, int]] = {}
    for rid, path in tqdm(files.items(), desc="PhysioNet 2012 stays", unit="stay",
                          disable=not progress, mininterval=2.0):
        stay = read_physionet_stay(path, on_malformed)
        issues.extend(i.to_dict() for i in stay.issues)
        try:
            b = bin_stay(stay)
        except DataError:
            empty.append(rid)
            _count(dropped, rid, stay.issues)
            continue
        issues.extend(i.to_dict() for i in b.outside)
        _count(dropped, rid, [*stay.issues, *b.outside])
        ids.append(rid)
        vals.append(b.values.astype(np.float32))
        stats_.append(b.static)
        hours.append(b.hours)
    n_var = len(series_variables())
    return {
        "record_ids": ids,
        "values": np.stack(vals) if vals else np.zeros((0, n_var, BINS), np.float32),
        "static": np.stack(stats_) if stats_ else np.zeros((0, 4)),
        "hours": np.asarray(hours, dtype=int),
        "issues": issues,
        "empty": empty,
        "dropped": dropped,
    }


def _count(dropped: dict[str, dict[str, int]], rid: str, issues: list[Issue]) -> None:
    if issues:
        dropped[rid] = count_dropped(issues)["by_reason"]


def _cache_key(files: Mapping[str, Path], on_malformed: str) -> str:
    h = hashlib.sha256()
    h.update(f"v{FEATURE_VERSION}|c{CACHE_VERSION}|{BINS}|{on_malformed}|"
             f"{mapping_table_sha256()}".encode())
    for rid, p in sorted(files.items()):
        st = p.stat()
        h.update(f"{rid}|{p.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode())
    return h.hexdigest()[:20]


def cached_features(files: Mapping[str, Path], cache_root: Path,
                    on_malformed: OnMalformed = "warn", progress: bool = True) -> dict[str, Any]:
    """:func:`featurize_files` once, then from ``cache_root/physionet2012-<key>.npz``.

    The key covers the file list (paths, sizes, times), the mapping table, the feature
    version and the cache format (:data:`CACHE_VERSION`), so a change in any of them rebuilds
    the cache. Bundled data is never written.
    """
    cache_root.mkdir(parents=True, exist_ok=True)
    path = cache_root / f"physionet2012-{_cache_key(files, on_malformed)}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return {
                "record_ids": z["record_ids"].tolist(), "values": z["values"],
                "static": z["static"], "hours": z["hours"],
                "issues": json.loads(str(z["issues"])), "empty": z["empty"].tolist(),
                "dropped": json.loads(str(z["dropped"])),
            }
    data = featurize_files(files, on_malformed, progress)
    # a name of its own: two runs building the same cache at once must not share a temp file
    fd, name = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp.npz", dir=cache_root)
    os.close(fd)
    tmp = Path(name)
    np.savez_compressed(
        tmp, record_ids=np.asarray(data["record_ids"], dtype=str), values=data["values"],
        static=data["static"], hours=data["hours"], issues=np.asarray(json.dumps(data["issues"])),
        empty=np.asarray(data["empty"], dtype=str), dropped=np.asarray(json.dumps(data["dropped"])),
    )
    tmp.replace(path)
    logger.info("cached features of %d stays in %s", len(data["record_ids"]), path)
    return data


# --------------------------------------------------------------------------- words
_UNITS = {"mm[Hg]": "mmHg", "Cel": "°C", "{score}": "", "1": "", "[pH]": "",
          "10*3/uL": "×10³/µL", "/min": "/min"}


def describe_variable(name: str, raw: np.ndarray, z: np.ndarray | None = None) -> str:
    """Plain words for one variable over the window, e.g. ``"lactate high and rising
    (4.2 mmol/L)"`` or ``"GCS low (6)"``.

    Args:
        name: PhysioNet parameter.
        raw: hourly raw values ``(T,)`` (NaN unobserved) in PhysioNet units.
        z: the same values standardised (trend is judged on this scale), optional.
    """
    var = variables()[name]
    seen = ~np.isnan(raw)
    if not seen.any():
        return f"{var.plain} not measured"
    if name == "MechVent":
        return "on mechanical ventilation"
    obs = raw[seen]
    last = float(np.nanmean(obs)) if var.aggregate == "sum" else float(obs[-1])
    if np.isnan(var.normal_low) or np.isnan(var.normal_high):
        level = ""  # no reference range (weight): the value speaks for itself
    else:
        level = ("low" if last < var.normal_low else "high" if last > var.normal_high
                 else "normal")
    trend = ""
    if z is not None and seen.sum() >= 2:
        zs = z[seen]
        change = float(zs[-1] - zs[0])
        trend = "rising" if change > 0.5 else "falling" if change < -0.5 else ""
    words = " ".join(w for w in (var.plain, level, "and" if level and trend else "", trend) if w)
    unit = _UNITS.get(var.ucum, var.ucum)
    sep = "" if not unit or unit.startswith("/") else " "
    per = " per hour" if var.aggregate == "sum" else ""
    value = f"{last:.3g}{sep}{unit}{per}"
    return f"{words} ({value})" if level or trend else f"{words} {value}"
