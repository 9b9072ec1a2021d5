"""Readers for PhysioNet/CinC 2012 ICU stays and the variable → LOINC mapping table.

A stay file has one ``Time,Parameter,Value`` line per measurement, ``Time`` as ``HH:MM`` since
ICU admission. The general descriptors (RecordID, Age, Gender, Height, ICUType, Weight) come
first at ``00:00``; ``-1`` means missing. Every line that cannot be used is an :class:`Issue`
carrying the file and line number and a reason code (:data:`DROP_REASONS`): with
``on_malformed="error"`` the first one raises a :class:`~meddx.errors.DataError`, with
``"warn"`` it is skipped, logged and listed — never silently absorbed.
:func:`count_dropped` counts them by reason (per stay in ``Sample.meta["dropped_lines"]``, per
split in ``DataBundle.info["dropped_lines"]``). Blank lines carry nothing and are not counted;
a descriptor given as ``-1`` at 00:00 is the format's "missing" and is not a dropped line.

Internally time is kept in whole or fractional **minutes** since ICU admission, so that the
PhysioNet and FHIR paths bin identically.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from meddx.errors import ConfigError, DataError

__all__ = [
    "Variable",
    "Issue",
    "DROP_REASONS",
    "count_dropped",
    "Stay",
    "OnMalformed",
    "variables",
    "series_variables",
    "mapping_table_sha256",
    "ICU_TYPES",
    "DESCRIPTORS",
    "read_physionet_stay",
    "read_outcomes",
    "read_split_list",
    "split_list_path",
    "make_split_lists",
    "stay_files",
]

logger = logging.getLogger(__name__)

OnMalformed = Literal["warn", "error"]

MAPPING_FILE = "physionet2012_loinc.csv"
#: ICU type codes of the challenge (Encounter.type in FHIR).
ICU_TYPES = {1: "coronary care unit", 2: "cardiac surgery recovery unit",
             3: "medical ICU", 4: "surgical ICU"}
#: General descriptors, recorded once at 00:00 at the top of each file.
DESCRIPTORS = ("RecordID", "Age", "Gender", "Height", "ICUType", "Weight")


@dataclass(frozen=True)
class Variable:
    """One row of the mapping table (``physionet2012_loinc.csv`` beside this module).

    ``role`` is ``series`` (time series, binned), ``static`` (descriptor) or ``identifier``.
    ``aggregate`` says how values in one time bin combine (``last``, ``sum``, ``max``);
    ``log`` marks skewed variables standardised on a log scale; ``plausible_*`` bound values
    accepted as physiological (outside: flagged as an issue); ``normal_*`` drive the words used
    in explanations.
    """

    parameter: str
    role: str
    system: str
    code: str
    display: str
    ucum: str
    category: str
    aggregate: str
    log: bool
    plausible_min: float
    plausible_max: float
    normal_low: float
    normal_high: float
    plain: str

    def plausible(self, value: float) -> bool:
        lo, hi = self.plausible_min, self.plausible_max
        return (math.isnan(lo) or value >= lo) and (math.isnan(hi) or value <= hi)


def _float(text: str) -> float:
    return float(text) if text.strip() else float("nan")


@lru_cache(maxsize=1)
def variables() -> dict[str, Variable]:
    """The mapping table, by PhysioNet parameter name (file order)."""
    text = resources.files(__package__).joinpath(MAPPING_FILE).read_text()
    out: dict[str, Variable] = {}
    for row in csv.DictReader(text.splitlines()):
        out[row["parameter"]] = Variable(
            parameter=row["parameter"], role=row["role"], system=row["system"],
            code=row["code"], display=row["display"], ucum=row["ucum"],
            category=row["category"], aggregate=row["aggregate"] or "last",
            log=row["log"] == "1",
            plausible_min=_float(row["plausible_min"]), plausible_max=_float(row["plausible_max"]),
            normal_low=_float(row["normal_low"]), normal_high=_float(row["normal_high"]),
            plain=row["plain"],
        )
    codes = [(v.system, v.code) for v in out.values() if v.code]
    if len(codes) != len(set(codes)):
        raise ConfigError(f"{MAPPING_FILE}: two variables share a code; a round trip would merge them")
    return out


def series_variables() -> list[str]:
    """Names of the time-series variables, in feature order."""
    return [name for name, v in variables().items() if v.role == "series"]


@lru_cache(maxsize=1)
def mapping_table_sha256() -> str:
    """Digest of the mapping table (part of the feature cache key and the model card)."""
    data = resources.files(__package__).joinpath(MAPPING_FILE).read_bytes()
    return hashlib.sha256(data).hexdigest()


#: Why a line of a stay file (or an item of a FHIR input) was left out: code → words.
DROP_REASONS: dict[str, str] = {
    # PhysioNet 2012 stay files
    "wrong_field_count": "not three fields (Time,Parameter,Value)",
    "unparsable_time": "time not HH:MM",
    "empty_parameter": "empty parameter name",
    "unparsable_value": "value not a number",
    "unknown_parameter": "parameter not in the mapping table",
    "repeated_descriptor": "descriptor repeated or not at 00:00",
    "invalid_descriptor": "descriptor with an invalid code",
    "missing_value": "-1 (missing) inside a time series",
    "implausible_value": "value outside the plausible range",
    # both sources: after ICU admission and within the prediction window only
    "out_of_window": "time outside the prediction window",
    # FHIR Bundles and CDS prefetch
    "unknown_code": "Observation code not used by the model",
    "unusable_status": "Observation status entered-in-error, cancelled or registered",
    "no_numeric_value": "Observation without a numeric value",
    "unit_not_convertible": "unit does not convert",
    "no_time": "Observation without an effective time",
    "unused_resource": "resource type not used (counted per resource)",
}


@dataclass
class Issue:
    """One line or item that was not used, with where it came from and why.

    ``code`` is a key of :data:`DROP_REASONS`; ``count`` is how many items the issue stands
    for (1, except for a summary such as "3 MedicationRequest resource(s) not used").
    """

    source: str
    line: int | None
    reason: str
    item: str = ""
    code: str = ""
    count: int = 1

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        return f"{where}: {self.reason}" + (f" ({self.item})" if self.item else "")

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"source": self.source, "line": self.line,
                                  "reason": self.reason, "item": self.item, "code": self.code}
        if self.count != 1:
            out["count"] = self.count
        return out


def count_dropped(issues: Iterable[Issue | Mapping[str, Any]]) -> dict[str, Any]:
    """Left-out lines by reason: ``{"total": n, "by_reason": {code: n}}`` (most frequent
    first; an issue without a code counts as ``other``)."""
    counts: Counter[str] = Counter()
    for i in issues:
        code, n = (i.code, i.count) if isinstance(i, Issue) else (i.get("code"), i.get("count", 1))
        counts[str(code or "other")] += int(n)
    return {"total": int(sum(counts.values())), "by_reason": dict(counts.most_common())}


@dataclass
class Stay:
    """One ICU stay, in PhysioNet units, whatever it was read from.

    Attributes:
        record_id: PhysioNet RecordID (or the FHIR Encounter id); never a patient identifier.
        age / sex / height / icu_type: descriptors (None when missing); sex is "female",
            "male" or None; icu_type 1–4.
        events: (minutes since ICU admission, parameter, value) in source order.
        issues: lines or items that were not used (malformed, implausible, unknown code …).
        basis: references of the FHIR Observations used (FHIR sources only), aligned with
            ``events``.
        prediction_minutes: the prediction time (minutes after admission) when the source
            states one (CDS Hooks); None: the time of the last observation.
        patient_ref / encounter_ref: FHIR references of the Patient and Encounter (FHIR only).
    """

    record_id: str
    age: float | None = None
    sex: str | None = None
    height: float | None = None
    icu_type: int | None = None
    events: list[tuple[float, str, float]] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    basis: list[str] = field(default_factory=list)
    prediction_minutes: float | None = None
    patient_ref: str | None = None
    encounter_ref: str | None = None


def _report(issue: Issue, on_malformed: OnMalformed, issues: list[Issue]) -> None:
    if on_malformed == "error":
        raise DataError(
            f"malformed input: {issue}",
            hint="fix the line, or read with on_malformed='warn' to skip such lines (they are "
            "listed, never silently absorbed)",
            path=issue.source, line=issue.line,
        )
    issues.append(issue)


def _parse_time(text: str) -> int | None:
    hh, sep, mm = text.strip().partition(":")
    # ASCII digits only ("²".isdigit() is True), and no more hours than a stay can last
    if not sep or not (hh + mm).isascii() or not hh.isdigit() or len(hh) > 5 \
            or not mm.isdigit() or len(mm) != 2 or int(mm) > 59:
        return None
    return int(hh) * 60 + int(mm)


def _set_descriptor(stay: Stay, name: str, value: float, issue: Issue,
                    on_malformed: OnMalformed) -> None:
    if name == "RecordID":
        return
    if value == -1:
        return  # documented "missing"
    if name == "Gender":
        if value not in (0, 1):
            _report(Issue(issue.source, issue.line, "Gender must be 0, 1 or -1", issue.item,
                          "invalid_descriptor"), on_malformed, stay.issues)
            return
        stay.sex = "male" if value == 1 else "female"
        return
    if name == "ICUType":
        if value not in ICU_TYPES:
            _report(Issue(issue.source, issue.line, "ICUType must be 1-4", issue.item,
                          "invalid_descriptor"), on_malformed, stay.issues)
            return
        stay.icu_type = int(value)
        return
    var = variables()[name]
    if not var.plausible(value):
        _report(Issue(issue.source, issue.line,
                      f"implausible {name} (accepted {var.plausible_min:g}-{var.plausible_max:g})",
                      issue.item, "implausible_value"), on_malformed, stay.issues)
        return
    if name == "Age":
        stay.age = value
    elif name == "Height":
        stay.height = value
    else:  # the admission weight is the first point of the weight series
        stay.events.append((0.0, "Weight", value))


def read_physionet_stay(path: str | Path, on_malformed: OnMalformed = "warn") -> Stay:
    """Read one PhysioNet 2012 stay file.

    Args:
        path: a ``set-*/NNNNNN.txt`` file.
        on_malformed: ``"error"`` raises on the first unusable line; ``"warn"`` skips it and
            lists it in ``Stay.issues`` (file and line number).

    Raises:
        DataError: the file cannot be read, has no header, or (``"error"``) a line is unusable.
    """
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read stay file: {e}", path=str(p)) from e
    if not lines or lines[0].replace(" ", "").lower() != "time,parameter,value":
        raise DataError("not a PhysioNet 2012 stay file (first line must be Time,Parameter,Value)",
                        path=str(p))
    table = variables()
    stay = Stay(record_id=p.stem)
    seen_descriptors: set[str] = set()
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split(",")
        issue = Issue(p.name, number, "", line.strip())

        def drop(reason: str, code: str, number: int = number, text: str = line.strip()) -> None:
            _report(Issue(p.name, number, reason, text, code), on_malformed, stay.issues)

        if len(parts) != 3:
            drop("expected Time,Parameter,Value", "wrong_field_count")
            continue
        minutes, name = _parse_time(parts[0]), parts[1].strip()
        try:
            value = float(parts[2])
        except ValueError:
            value = float("nan")
        if minutes is None:
            drop("unreadable time (expected HH:MM)", "unparsable_time")
            continue
        if not name:
            drop("empty parameter name", "empty_parameter")
            continue
        if not math.isfinite(value):
            drop("unreadable value", "unparsable_value")
            continue
        if name not in table:
            drop(f"unknown parameter '{name}'", "unknown_parameter")
            continue
        if name in DESCRIPTORS and minutes == 0 and name not in seen_descriptors:
            seen_descriptors.add(name)
            if name == "RecordID":
                stay.record_id = str(int(value)) if value.is_integer() else p.stem
            _set_descriptor(stay, name, value, issue, on_malformed)
            continue
        if table[name].role != "series":
            drop(f"descriptor '{name}' repeated", "repeated_descriptor")
            continue
        if value == -1:
            drop("value -1 (missing) inside the time series", "missing_value")
            continue
        if not table[name].plausible(value):
            var = table[name]
            drop(f"implausible {name} (accepted {var.plausible_min:g}-{var.plausible_max:g})",
                 "implausible_value")
            continue
        stay.events.append((float(minutes), name, value))
    return stay


def read_outcomes(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Outcome files (``Outcomes-a.txt`` …) → one row per RecordID (string index).

    Columns: ``saps_i`` and ``sofa`` (-1 → NaN), ``length_of_stay``, ``survival``,
    ``in_hospital_death`` (0/1).
    """
    frames = []
    for path in paths:
        try:
            df = pd.read_csv(path)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read outcomes file: {e}", path=str(path)) from e
        missing = {"RecordID", "In-hospital_death"} - set(df.columns)
        if missing:
            raise DataError(f"outcomes file lacks columns {sorted(missing)}", path=str(path))
        bad = ~df["In-hospital_death"].isin([0, 1])
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0]) + 2
            raise DataError("In-hospital_death must be 0 or 1", path=str(path), line=row)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    out = pd.DataFrame({
        "saps_i": df.get("SAPS-I", pd.Series(np.nan, index=df.index)).replace(-1, np.nan),
        "sofa": df.get("SOFA", pd.Series(np.nan, index=df.index)).replace(-1, np.nan),
        "length_of_stay": df.get("Length_of_stay", pd.Series(np.nan, index=df.index)),
        "survival": df.get("Survival", pd.Series(np.nan, index=df.index)).replace(-1, np.nan),
        "in_hospital_death": df["In-hospital_death"].astype(int),
    })
    out.index = df["RecordID"].astype(int).astype(str)
    if out.index.duplicated().any():
        dup = out.index[out.index.duplicated()][0]
        raise DataError(f"RecordID {dup} appears twice in the outcome files")
    return out.astype({"saps_i": float, "sofa": float})


def stay_files(root: str | Path) -> dict[str, Path]:
    """RecordID → stay file for every ``*.txt`` under ``root`` except outcome files."""
    files = {}
    for p in sorted(Path(root).rglob("*.txt")):
        if p.name.lower().startswith("outcomes") or not p.stem.isdigit():
            continue
        if p.stem in files:
            raise DataError(f"record {p.stem} found twice", path=str(p))
        files[p.stem] = p
    return files


def split_list_path(name: str, split: str) -> Path:
    """Record list of one split: the packaged ``splits/<name>_<split>.txt`` (beside this module) for a bare
    name that has one, else ``<name>/<split>.txt`` where ``name`` is a folder (your own lists,
    e.g. cross-validation folds). A folder in the working directory that happens to be called
    ``physionet2012`` does not shadow the packaged lists."""
    packaged = Path(str(resources.files(__package__).joinpath("splits", f"{name}_{split}.txt")))
    own = Path(name).expanduser()
    if own.is_dir() and not (Path(name).name == name and packaged.is_file()):
        return own / f"{split}.txt"
    return packaged


def read_split_list(path: str | Path) -> list[str]:
    """RecordIDs, one per line (``#`` comments allowed)."""
    lines = Path(path).read_text().splitlines()
    return [s.strip() for s in lines if s.strip() and not s.startswith("#")]


def make_split_lists(outcomes: pd.DataFrame, fractions: Sequence[float] = (0.7, 0.1, 0.2),
                     seed: int = 2012) -> dict[str, list[str]]:
    """Stratified (on in-hospital death) train/val/test record lists.

    This is how ``data/splits/physionet2012_*.txt`` were made (seed 2012, 70/10/20 of set-a +
    set-b); kept so the lists can be re-derived and checked.
    """
    from sklearn.model_selection import train_test_split

    ids = np.asarray(sorted(outcomes.index, key=int))
    y = outcomes.loc[ids, "in_hospital_death"].to_numpy()
    train_f, val_f, test_f = fractions
    rest, test = train_test_split(ids, test_size=test_f, random_state=seed, stratify=y)
    y_rest = outcomes.loc[rest, "in_hospital_death"].to_numpy()
    train, val = train_test_split(rest, test_size=val_f / (train_f + val_f), random_state=seed,
                                  stratify=y_rest)
    return {k: sorted(v.tolist(), key=int) for k, v in
            {"train": train, "val": val, "test": test}.items()}
