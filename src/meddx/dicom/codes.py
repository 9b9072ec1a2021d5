"""The coded concepts of meddx's DICOM results.

Standard codes (DICOM ``DCM``, SNOMED CT ``SCT``, ``UCUM`` units) where one exists; the private
coding scheme ``99MEDDX`` (declared in each SR's Coding Scheme Identification Sequence) for
what only meddx says: calibrated probability, decision at an operating point, conformal set,
out-of-distribution flag, and the class names of a model.
"""

from __future__ import annotations

import highdicom as hd
import highdicom.coding_schemes

__all__ = ["MEDDX_SCHEME", "CODING_SCHEME", "C", "class_code", "yes_no"]

MEDDX_SCHEME = "99MEDDX"

CODING_SCHEME = hd.coding_schemes.CodingSchemeIdentificationItem(
    designator=MEDDX_SCHEME,
    name="meddx model outputs",
    responsible_organization="meddx project",
)


def _meddx(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=MEDDX_SCHEME, meaning=meaning)


def _std(value: str, scheme: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


class C:
    """Every concept the writers use, in one place (readers and tests look them up here)."""

    IMAGING_PROCEDURE = _std("363679005", "SCT", "Imaging procedure")
    POSITIVE = _std("10828004", "SCT", "Positive")
    NEGATIVE = _std("260385009", "SCT", "Negative")
    YES = _std("373066001", "SCT", "Yes")
    NO = _std("373067005", "SCT", "No")
    DEVICE = _std("121007", "DCM", "Device")
    NO_UNITS = _std("1", "UCUM", "no units")
    SLIDE_PROCEDURE = _std("108257001", "SCT", "Anatomic pathology procedure")
    # meddx-specific
    CALIBRATED_PROBABILITY = _meddx("CALPROB", "Calibrated probability")
    PROBABILITY = _meddx("PROB", "Probability before calibration")
    PREDICTED_VALUE = _meddx("VALUE", "Predicted value")
    PREDICTED_CLASS = _meddx("PREDCLASS", "Most probable class")
    DECISION = _meddx("DECISION", "Decision at operating point")
    POSITIVE_CLASS = _meddx("POSCLASS", "Positive class of the decision")
    OPERATING_POINT = _meddx("OPPOINT", "Operating point")
    THRESHOLD = _meddx("THRESHOLD", "Decision threshold")
    CONFORMAL_MEMBER = _meddx("CONFSET", "Conformal prediction set member")
    REFER = _meddx("REFER", "Refer to a human reader")
    REVIEW = _meddx("REVIEW", "Decision and conformal set disagree")
    OOD = _meddx("OOD", "Out of distribution")
    OOD_SCORE = _meddx("OODSCORE", "Out-of-distribution score")
    AGGREGATION = _meddx("AGGREGATION", "Aggregation over images")
    SERIES_RESULT = _meddx("SERIESRESULT", "Series-level result")
    IMAGE_RESULT = _meddx("IMAGERESULT", "Image-level result")
    SLIDE_RESULT = _meddx("SLIDERESULT", "Slide-level result")
    CLASS_RESULT = _meddx("CLASSRESULT", "Per-class result")


def class_code(name: str) -> hd.sr.CodedConcept:
    """A model's class name as a ``99MEDDX`` code (value and meaning are the name; names over
    16 characters go into Long Code Value, as DICOM requires)."""
    return _meddx(name.replace("\\", "/"), name)


def yes_no(flag: bool) -> hd.sr.CodedConcept:
    return C.YES if flag else C.NO
