"""Tabular side inputs beside a model's main input: age, sex, anatomical site.

A dermatologist sees the patient as well as the lesion; a package can too. The experiment
config names the side inputs (``side_inputs: [age, sex]``, or full :class:`SideInput` entries);
after training, a logistic model over the image network's logits and the encoded side inputs
is fitted on the calibration split (late fusion; :mod:`meddx.training.sideinputs`) and stored
in the card as a :class:`SideInputFusion`. The image network is unchanged; at prediction time
the fused logits replace the image logits before temperature, operating point and conformal
set (all refitted on calib on the fused logits).

Encoding (one mechanism for every surface: CLI CSV, REST body, FHIR ``Patient``):

- numeric (age in years): ``(value - mean) / std`` with mean and std of the calibration split,
  plus a ``<name>:missing`` flag (1 and value 0 when absent);
- categorical (sex, site): one-hot over the allowed categories plus ``<name>:missing``.

A missing value is never imputed silently: its flag is set and the prediction's notes name it.
A value outside the allowed range or categories is a :class:`~meddx.errors.DataError` (HTTP 422)
naming the input and the allowed values.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from meddx.errors import ConfigError, DataError

__all__ = ["SideInput", "SideInputFusion", "PRESETS", "MISSING", "resolve_side_inputs",
           "from_patient", "age_in_years", "read_side_table", "match_row", "parse_records", "note"]

# values that mean "not recorded" in a CSV cell or a JSON value (case-insensitive)
MISSING = frozenset({"", "unknown", "na", "n/a", "nan", "none", "null", "missing"})
ID_COLUMNS = ("id", "image_id", "image", "path", "file", "filename", "name")

ISIC_SITES = ["anterior torso", "head/neck", "lateral torso", "lower extremity",
              "oral/genital", "palms/soles", "posterior torso", "upper extremity"]


class SideInput(BaseModel):
    """One tabular input the model expects beside its main input.

    Args:
        name: the key in a JSON body and the column in a CSV.
        kind: ``numeric`` (standardised + missing flag) or ``categorical`` (one-hot + missing).
        unit: the unit of a numeric value (``years``).
        minimum / maximum: the allowed range of a numeric value (outside: an error).
        categories: the allowed values of a categorical input (lower case; others: an error).
        aliases: other column names read as this input (``age_approximate`` in ISIC's CSVs).
        description: what the value is, for the model card.
        mean / std: fitted on the calibration split (numeric inputs; set by the fit).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    kind: Literal["numeric", "categorical"]
    unit: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    categories: list[str] = Field(default_factory=list)
    aliases: list[str] = Field(default_factory=list)
    description: str = ""
    mean: float | None = None
    std: float | None = None

    def features(self) -> list[str]:
        """Names of the encoded columns, in order."""
        if self.kind == "numeric":
            return [self.name, f"{self.name}:missing"]
        return [f"{self.name}={c}" for c in self.categories] + [f"{self.name}:missing"]

    def parse(self, value: Any) -> float | str | None:
        """The checked value (None: missing).

        Raises:
            DataError: not a number, outside the range, or not an allowed category.
        """
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        if isinstance(value, str) and value.strip().lower() in MISSING:
            return None
        if self.kind == "numeric":
            return self._number(value)
        text = str(value).strip().lower()
        if not isinstance(value, str) or text not in self.categories:
            raise DataError(f"side input '{self.name}': {str(value)[:40]!r} is not one of its "
                            f"categories", hint=f"allowed: {', '.join(self.categories)}; "
                            "leave it out or send null when unknown")
        return text

    def _number(self, value: Any) -> float:
        try:
            x = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            x = math.nan
        if not math.isfinite(x):
            raise DataError(f"side input '{self.name}': {str(value)[:40]!r} is not a number",
                            hint=f"give {self.name} in {self.unit or 'its unit'}, or null when "
                                 "unknown")
        lo = -math.inf if self.minimum is None else self.minimum
        hi = math.inf if self.maximum is None else self.maximum
        if not lo <= x <= hi:
            raise DataError(f"side input '{self.name}': {x:g} is outside {lo:g}–{hi:g}"
                            + (f" {self.unit}" if self.unit else ""),
                            hint=f"give {self.name} in {self.unit or 'its unit'}")
        return x

    def encode(self, value: float | str | None) -> list[float]:
        """Encoded columns of one checked value (:meth:`parse`)."""
        if self.kind == "numeric":
            if value is None:
                return [0.0, 1.0]
            std = self.std if self.std else 1.0
            return [(float(value) - (self.mean or 0.0)) / std, 0.0]
        return [float(value == c) for c in self.categories] + [float(value is None)]

    def card_entry(self) -> dict[str, Any]:
        """What the card lists for this input (units, allowed values, encoding)."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind,
                               "description": self.description}
        if self.kind == "numeric":
            out.update(unit=self.unit, range=[self.minimum, self.maximum],
                       encoding=f"(value - {self.mean or 0:.3g}) / {self.std or 1:.3g}, "
                                "plus a missing flag")
        else:
            out.update(allowed=self.categories, encoding="one-hot, plus a missing flag")
        return out


PRESETS: dict[str, SideInput] = {
    "age": SideInput(name="age", kind="numeric", unit="years", minimum=0, maximum=120,
                     aliases=["age_approximate"],
                     description="age in years when the image was taken"),
    "sex": SideInput(name="sex", kind="categorical", categories=["female", "male"],
                     aliases=["gender"], description="sex as recorded (FHIR Patient.gender)"),
    "site": SideInput(name="site", kind="categorical", categories=ISIC_SITES,
                      aliases=["anatom_site_general", "anatom_site_general_challenge"],
                      description="anatomical site of the lesion (ISIC's general sites)"),
}


def resolve_side_inputs(entries: Sequence[Any]) -> list[SideInput]:
    """Config entries (a preset name or a full spec) as :class:`SideInput` objects.

    Raises:
        ConfigError: an unknown preset name or a name given twice.
    """
    out: list[SideInput] = []
    for e in entries:
        if isinstance(e, SideInput):
            out.append(e)
        elif isinstance(e, str):
            if e not in PRESETS:
                from meddx.registry import suggest

                raise ConfigError(f"unknown side input '{e}'" + suggest(e, list(PRESETS)),
                                  hint=f"presets: {', '.join(PRESETS)}; or give a full entry "
                                       "{name, kind, unit, categories}")
            out.append(PRESETS[e])
        else:
            out.append(SideInput.model_validate(e))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"side inputs named twice: {names}")
    return out


def _lookup(record: Mapping[str, Any], spec: SideInput) -> Any:
    for key in (spec.name, *spec.aliases):
        if key in record:
            return record[key]
    return None


def parse_records(inputs: Sequence[SideInput], records: Sequence[Mapping[str, Any] | None],
                  strict: bool = False) -> list[dict[str, float | str | None]]:
    """Checked values per record (None: missing). ``strict``: a key that names no input is an
    error (a JSON body); a CSV's other columns are ignored.

    Raises:
        DataError: a record that is not an object, an unknown key (strict), or a bad value.
    """
    known = {k for s in inputs for k in (s.name, *s.aliases)}
    out = []
    for i, rec in enumerate(records):
        if rec is None:
            rec = {}
        if not isinstance(rec, Mapping):
            raise DataError(f"side inputs of input {i} must be an object of name → value",
                            hint="e.g. {\"age\": 55, \"sex\": \"female\"}")
        if strict:
            extra = [str(k) for k in rec if k not in known]
            if extra:
                from meddx.registry import suggest

                raise DataError(f"unknown side input '{extra[0][:40]}'"
                                + suggest(extra[0], [s.name for s in inputs]),
                                hint=f"this model takes: {', '.join(s.name for s in inputs)}")
        out.append({s.name: s.parse(_lookup(rec, s)) for s in inputs})
    return out


class SideInputFusion(BaseModel):
    """Late fusion stored in the card: fused logits = ``[image logits, encoded side inputs,
    derived features] @ coef.T + intercept``, a logistic model (multinomial for
    several classes) fitted on calib.

    ``image_features`` name the network logits used; ``missing_in_fit`` counts missing values
    per input in the fitting split. ``derived`` names features the modality computes from the
    input itself (an ECG's RR-interval and HRV features, ``rhythm:*``): nobody sends them.
    With ``derived_model`` (a package file: an ONNX gradient-boosted model trained on the
    train split's features, so calib stays unseen for the fusion) the block fused is that
    model's class log-probabilities (``derived_outputs``); without, the features themselves.
    A missing value of the block takes the calib median, and all are standardised with calib's
    mean and std.
    """

    model_config = ConfigDict(extra="forbid")

    method: Literal["late-logistic"] = "late-logistic"
    inputs: list[SideInput]
    image_features: list[str]
    coef: list[list[float]]
    intercept: list[float]
    fitted_on: str = "calib"
    n_fit: int = 0
    missing_in_fit: dict[str, int] = Field(default_factory=dict)
    regularisation_c: float = 1.0
    derived: list[str] = Field(default_factory=list)
    derived_fill: list[float] = Field(default_factory=list)
    derived_mean: list[float] = Field(default_factory=list)
    derived_std: list[float] = Field(default_factory=list)
    derived_model: str | None = None
    derived_model_info: dict[str, Any] = Field(default_factory=dict)
    derived_outputs: list[str] = Field(default_factory=list)

    @property
    def block(self) -> list[str]:
        """Names of the derived block's columns: the model's outputs, or the features."""
        return self.derived_outputs or self.derived

    @property
    def features(self) -> list[str]:
        return [*self.image_features, *[f for s in self.inputs for f in s.features()],
                *(self.block if self.derived else [])]

    def derived_matrix(self, block: np.ndarray | None, n: int) -> np.ndarray:
        """The derived block (n, len(block)) filled and standardised; None: all missing."""
        if not self.derived:
            return np.zeros((n, 0))
        k = len(self.block)
        x = (np.full((n, k), np.nan) if block is None
             else np.asarray(block, dtype=np.float64).reshape(n, k))
        fill = np.asarray(self.derived_fill or np.zeros(k))
        x = np.where(np.isfinite(x), x, fill)
        mean = np.asarray(self.derived_mean or np.zeros(k))
        std = np.asarray(self.derived_std or np.ones(k))
        return (x - mean) / std

    def design(self, logits: np.ndarray, values: Sequence[Mapping[str, Any]],
               derived: np.ndarray | None = None) -> np.ndarray:
        """The fitted model's design matrix for image logits, checked values and derived
        features."""
        n = len(values)
        side = np.array([[x for s in self.inputs for x in s.encode(v.get(s.name))]
                         for v in values], dtype=np.float64).reshape(n, -1)
        return np.column_stack([np.asarray(logits, np.float64).reshape(n, -1), side,
                                self.derived_matrix(derived, n)])

    def fuse(self, logits: np.ndarray, values: Sequence[Mapping[str, Any]],
             derived: np.ndarray | None = None) -> np.ndarray:
        """Fused logits, shaped like ``logits``."""
        z = self.design(logits, values, derived) @ np.asarray(self.coef).T \
            + np.asarray(self.intercept)
        return z.astype(np.float32)

    def expects(self) -> list[dict[str, Any]]:
        """The inputs as the card and ``GET /v1/models/{name}`` list them (the ones a caller
        sends; derived features are computed from the input)."""
        return [s.card_entry() for s in self.inputs]


def note(inputs: Sequence[SideInput], values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The prediction note: values used, the missing ones (flagged, not imputed), the source."""
    missing = [s.name for s in inputs if values.get(s.name) is None]
    return {"used": {k: v for k, v in values.items() if v is not None}, "missing": missing,
            "source": source}


def from_patient(patient: Mapping[str, Any] | None, on: date | str | None = None
                 ) -> tuple[dict[str, Any], list[str]]:
    """Age (years at ``on``, default today) and sex from a FHIR ``Patient``; with notes.

    ``gender`` male/female map to sex; ``other`` and ``unknown`` are missing (the note says
    so). No birth date: age missing. Never returns the birth date itself.

    Raises:
        DataError: a malformed ``birthDate`` or a ``gender`` outside FHIR's value set.
    """
    if not isinstance(patient, Mapping) or patient.get("resourceType") != "Patient":
        return {}, ["No FHIR Patient in the prefetch: age and sex missing"]
    when = _as_date(on) if on is not None else date.today()
    rec: dict[str, Any] = {}
    notes: list[str] = []
    bd = patient.get("birthDate")
    if isinstance(bd, str) and bd:
        years = age_in_years(bd, when)
        if years < 0:
            raise DataError("Patient.birthDate is after the service date")
        rec["age"] = years
    else:
        notes.append("Patient.birthDate absent: age missing")
    gender = patient.get("gender")
    if gender in ("male", "female"):
        rec["sex"] = gender
    elif gender in (None, "other", "unknown"):
        notes.append(f"Patient.gender {gender or 'absent'}: sex missing")
    else:
        raise DataError("Patient.gender is not one of FHIR's male, female, other, unknown")
    return rec, notes


def age_in_years(birth_date: str, on: date) -> int:
    """Completed years from a FHIR ``birthDate`` to ``on`` (negative if born after ``on``).

    The one age rule of the project (side inputs from a ``Patient``, the EHR's ICU stays): a
    partial date (``YYYY`` or ``YYYY-MM``) stands for the middle of its span (1 July, the 15th),
    which halves the worst-case error against taking its first day.

    Raises:
        DataError: ``birth_date`` is not a FHIR date.
    """
    born = _birth_date(birth_date)
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))


def _birth_date(text: str) -> date:
    """FHIR date: YYYY, YYYY-MM or YYYY-MM-DD (partial dates take the middle of the span)."""
    parts = text.split("-")
    try:
        if len(parts) == 1:
            return date(int(parts[0]), 7, 1)
        if len(parts) == 2:
            return date(int(parts[0]), int(parts[1]), 15)
        return date.fromisoformat(text[:10])
    except ValueError as e:
        raise DataError("Patient.birthDate is not a FHIR date (YYYY[-MM[-DD]])") from e


def _as_date(on: date | str) -> date:
    if isinstance(on, date):
        return on
    try:
        return datetime.fromisoformat(str(on).replace("Z", "+00:00")).date()
    except ValueError as e:
        raise DataError(f"service date {str(on)[:30]!r} is not an ISO date") from e


def read_side_table(path: str | Path) -> dict[str, dict[str, str]]:
    """A CSV of side inputs: one row per input, keyed by its id/path column (the file name
    and its stem both match).

    Raises:
        DataError: no such file, no id column, or an id given twice.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"side-input table not found: {p}", path=str(p))
    with p.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    cols = list(rows[0]) if rows else []
    key = next((c for c in cols if c.strip().lower() in ID_COLUMNS), None)
    if key is None:
        raise DataError("the side-input table has no id column", path=str(p),
                        hint=f"name one column {' or '.join(ID_COLUMNS[:4])} (the image's file "
                             "name or stem)")
    out: dict[str, dict[str, str]] = {}
    for row in rows:
        ident = Path(str(row[key]).strip()).name
        if ident in out:
            raise DataError(f"the side-input table names one input twice (row {len(out) + 2})",
                            path=str(p))
        out[ident] = {k: v for k, v in row.items() if k != key}
    return out


def match_row(table: Mapping[str, Mapping[str, Any]], name: str) -> Mapping[str, Any] | None:
    """The row of ``table`` for an input file name (exact name, else the stem)."""
    if name in table:
        return table[name]
    stem = Path(name).stem
    return table.get(stem) or next((v for k, v in table.items() if Path(k).stem == stem), None)
