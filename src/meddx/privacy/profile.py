"""PS3.15 Table E.1-1 as data: which action the Basic Profile asks for, per attribute.

The table ships beside this module (``ps3.15_table_e1-1.json``, DICOM edition 2024e, see
``TABLE_E1-1_SOURCE.md``). Every row's Basic Profile code is resolved to ONE action here, so
the de-identifier never carries a hand-written partial list:

==========  ==========  ====================================================================
code        action      why this choice (PS3.15 E.3)
==========  ==========  ====================================================================
X           remove
Z           empty       zero length; sequences become empty
D           dummy       a non-identifying value of the same VR (``dummy_value``); for a
                        sequence, every text, date and code in its items (see ``deid``)
U           remap       UIDs replaced by salted UIDs, the same input UID → the same new UID
Z/D, X/D,   dummy       D is allowed by all three and satisfies an IOD where the attribute is
X/Z/D                   Type 1, so no IOD loses a required attribute
X/Z         empty       Z keeps the attribute present where the IOD makes it Type 2
X/Z/U*      remap       sequences of references kept, their UIDs remapped (references stay
                        consistent inside the de-identified set)
==========  ==========  ====================================================================

Ranges: ``(50xx,xxxx)`` curves, ``(60xx,3000)``/``(60xx,4000)`` overlay data and comments,
and ``(gggg,eeee)`` with odd ``gggg`` (private attributes) are all removed. The rest of an
overlay group (``60xx``) describes the removed overlay and goes with it.

Options (PS3.15 Table E.1-1's columns): with *Retain Patient Characteristics* the rows coded
``K`` are kept; its ``C`` rows (free text such as allergies) cannot be cleaned automatically
and keep the Basic Profile action.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from importlib import resources
from typing import Any

__all__ = ["Action", "EDITION", "Row", "action_for", "dummy_value", "table_rows"]

EDITION = "2024e"
TABLE_FILE = "ps3.15_table_e1-1.json"


class Action(StrEnum):
    """What happens to one attribute."""

    REMOVE = "X"
    EMPTY = "Z"
    DUMMY = "D"
    REMAP = "U"
    KEEP = "K"


# One concrete action per Basic Profile code (see the module docstring for why).
_RESOLVE = {"X": Action.REMOVE, "Z": Action.EMPTY, "D": Action.DUMMY, "U": Action.REMAP,
            "Z/D": Action.DUMMY, "X/D": Action.DUMMY, "X/Z/D": Action.DUMMY,
            "X/Z": Action.EMPTY, "X/Z/U*": Action.REMAP}


@dataclass(frozen=True)
class Row:
    """One row of Table E.1-1."""

    name: str
    tag: str
    code: str
    options: dict[str, str]

    @property
    def action(self) -> Action:
        """The Basic Profile action this row resolves to."""
        return _RESOLVE[self.code]


@cache
def table_rows() -> tuple[Row, ...]:
    """All rows of the shipped Table E.1-1, in file order.

    Raises:
        ValueError: a row carries a Basic Profile code this module does not know (a newer
            edition): fail loudly rather than guess.
    """
    text = resources.files("meddx.privacy").joinpath(TABLE_FILE).read_text(encoding="utf-8")
    rows = []
    for raw in json.loads(text):
        if raw["basicProfile"] not in _RESOLVE:
            raise ValueError(f"unknown Basic Profile code {raw['basicProfile']!r} for "
                             f"{raw['tag']} in {TABLE_FILE}")
        options = {k: v for k, v in raw.items() if k.endswith("Opt") and v}
        rows.append(Row(raw["name"], raw["tag"], raw["basicProfile"], options))
    return tuple(rows)


@cache
def _by_tag() -> dict[int, Row]:
    rows = {}
    for row in table_rows():
        digits = row.tag.strip("()").replace(",", "")
        if len(digits) == 8 and all(c in "0123456789ABCDEFabcdef" for c in digits):
            rows[int(digits, 16)] = row
    return rows


def action_for(tag: int, *, keep_patient_characteristics: bool = False) -> Action | None:
    """The action Table E.1-1 asks for at ``tag``, or None where the table is silent.

    Args:
        tag: the attribute tag as an int (``0xggggeeee``).
        keep_patient_characteristics: apply the Retain Patient Characteristics Option.
    """
    group = tag >> 16
    if group % 2:
        return Action.REMOVE  # (gggg,eeee) where gggg is odd: private attributes
    if group & 0xFF00 in (0x5000, 0x6000):
        return Action.REMOVE  # (50xx,xxxx) curves; (60xx,3000/4000) and the rest of overlays
    row = _by_tag().get(tag)
    if row is None:
        return None
    if keep_patient_characteristics and row.options.get("rtnPatCharsOpt") == "K":
        return Action.KEEP
    return row.action


_DUMMY_TEXT = "ANONYMIZED"
_DUMMIES: dict[str, Any] = {
    "DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000Y",
    "DS": "0", "IS": "0", "UR": "urn:meddx:removed", "PN": "ANONYMIZED^",
    "US": 0, "SS": 0, "UL": 0, "SL": 0, "UV": 0, "SV": 0, "FL": 0.0, "FD": 0.0, "AT": 0,
    "OB": b"\x00\x00", "OW": b"\x00\x00", "OD": b"\x00" * 8, "OF": b"\x00" * 4,
    "OL": b"\x00" * 4, "OV": b"\x00" * 8, "UN": b"\x00\x00",
}


def dummy_value(vr: str) -> Any:
    """A fixed, non-identifying, non-empty value valid for ``vr`` (SQ and UI are not here:
    sequences are emptied, UIDs remapped)."""
    return _DUMMIES.get(vr, _DUMMY_TEXT)
