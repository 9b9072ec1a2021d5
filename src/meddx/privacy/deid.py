"""DICOM de-identification: PS3.15 Table E.1-1 for what it lists, an allow-list for free text.

Every attribute Table E.1-1 (Basic Application Level Confidentiality Profile, shipped as data,
see :mod:`meddx.privacy.profile`) lists gets the table's action: removed (X), emptied (Z),
given a dummy (D) or remapped to a salted UID (U). Curves, overlays and private attributes go.
The profile keeps what it does not list; meddx is stricter about free text there:

* unlisted attributes on the allow-list :data:`KEEP` (what decodes and interprets the pixels
  and waveforms: Image Pixel module, LUTs, geometry, acquisition technique, codes) are kept;
* unlisted numbers and coded strings (CS, DS, IS, US, FL …) are kept — they carry no names;
* unlisted well-known UIDs (SOP classes, transfer syntaxes) are kept, other UIDs remapped;
* every other unlisted text, name or date gets a dummy and other binary values are emptied —
  never deleted, so an IOD's Type 1 and 2 attributes stay present; unknown public tags go;
* sequences are walked item by item with the same rules; inside a sequence the table says D
  for, every text, name, date and code becomes a dummy and every UID is remapped (the
  structure, coded strings and numbers stay: an SR's content tree still parses).

On top: Patient ID gets a salted pseudonym (its D dummy), ``PatientIdentityRemoved = YES``
and ``DeidentificationMethodCodeSequence`` (DCM 113100; 113108 with patient characteristics)
record what was done, the 128-byte preamble is zeroed and the file meta rebuilt, and
burned-in annotation is refused unless allowed: pixel text cannot be cleaned here.

This is not a certified de-identifier; review the output before releasing data.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

from meddx.errors import ConfigError, DataError
from meddx.privacy.profile import EDITION, Action, action_for, dummy_value

__all__ = ["BURNED_IN_HINT", "DeidReport", "KEEP", "deidentify", "new_uid"]

_PIXELS = """SamplesPerPixel PhotometricInterpretation Rows Columns BitsAllocated BitsStored HighBit
PixelRepresentation PlanarConfiguration PixelAspectRatio SmallestImagePixelValue
LargestImagePixelValue PixelPaddingValue PixelPaddingRangeLimit PixelData FloatPixelData
DoubleFloatPixelData NumberOfFrames FrameIncrementPointer FrameTime ICCProfile ColorSpace
RedPaletteColorLookupTableDescriptor GreenPaletteColorLookupTableDescriptor
BluePaletteColorLookupTableDescriptor RedPaletteColorLookupTableData
GreenPaletteColorLookupTableData BluePaletteColorLookupTableData
SegmentedRedPaletteColorLookupTableData SegmentedGreenPaletteColorLookupTableData
SegmentedBluePaletteColorLookupTableData LossyImageCompression LossyImageCompressionRatio
LossyImageCompressionMethod SpecificCharacterSet"""
_LUTS = """RescaleIntercept RescaleSlope RescaleType ModalityLUTSequence LUTDescriptor LUTData
ModalityLUTType WindowCenter WindowWidth VOILUTFunction VOILUTSequence PresentationLUTShape
PixelValueTransformationSequence FrameVOILUTSequence"""
_GEOMETRY = """PixelSpacing ImagerPixelSpacing NominalScannedPixelSpacing PixelSpacingCalibrationType
SliceThickness SpacingBetweenSlices ImageOrientationPatient ImagePositionPatient SliceLocation
PatientOrientation PatientPosition FrameOfReferenceUID SharedFunctionalGroupsSequence
PerFrameFunctionalGroupsSequence PixelMeasuresSequence PlanePositionSequence
PlaneOrientationSequence SequenceOfUltrasoundRegions RegionSpatialFormat RegionDataType
RegionFlags RegionLocationMinX0 RegionLocationMinY0 RegionLocationMaxX1 RegionLocationMaxY1
ReferencePixelX0 ReferencePixelY0 PhysicalUnitsXDirection PhysicalUnitsYDirection
ReferencePixelPhysicalValueX ReferencePixelPhysicalValueY PhysicalDeltaX PhysicalDeltaY
TransducerFrequency"""
_IMAGE = """SOPClassUID SOPInstanceUID StudyInstanceUID SeriesInstanceUID Modality ImageType
BodyPartExamined Laterality ImageLaterality ViewPosition SeriesNumber InstanceNumber
AcquisitionNumber ConversionType BurnedInAnnotation RecognizableVisualFeatures
PresentationIntentType Manufacturer ManufacturerModelName"""
_TECHNIQUE = """KVP ExposureTime XRayTubeCurrent Exposure ExposureInuAs ConvolutionKernel
ReconstructionDiameter GantryDetectorTilt RotationDirection ScanOptions DataCollectionDiameter
FilterType FocalSpots CTDIvol SpiralPitchFactor DistanceSourceToDetector
DistanceSourceToPatient MagneticFieldStrength RepetitionTime EchoTime InversionTime FlipAngle
EchoTrainLength ScanningSequence SequenceVariant MRAcquisitionType ImagedNucleus
ImagingFrequency NumberOfAverages PercentSampling PercentPhaseFieldOfView PixelBandwidth
AcquisitionMatrix InPlanePhaseEncodingDirection SAR ContrastBolusAgent ContrastBolusRoute
DoseGridScaling DoseUnits DoseType DoseSummationType GridFrameOffsetVector"""
_WAVEFORM = """WaveformSequence WaveformData WaveformPaddingValue MultiplexGroupLabel ChannelLabel
ChannelMinimumValue ChannelMaximumValue"""
_CODES = """CodeValue CodingSchemeDesignator CodingSchemeVersion CodeMeaning LongCodeValue
URNCodeValue ContextIdentifier ContextUID MappingResource ContextGroupVersion
PositionReferenceIndicator"""

KEEP = frozenset(" ".join((_PIXELS, _LUTS, _GEOMETRY, _IMAGE, _TECHNIQUE, _WAVEFORM, _CODES)).split())
"""Unlisted attributes kept whatever their VR (Table E.1-1 wins where it lists one)."""
_BINARY_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})
_SAFE_VRS = frozenset({"CS", "DS", "IS", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "AT"})
BURNED_IN_HINT = ("mask the text first, or re-run with --allow-burned-in once you have checked "
                  "that the pixels identify no one")


@dataclass
class DeidReport:
    """What :func:`deidentify` did to one dataset."""

    removed: int = 0
    private_removed: int = 0
    emptied: int = 0
    dummied: int = 0
    uids_replaced: int = 0
    kept: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _pseudonym(salt: str, value: str, prefix: str = "MDX") -> str:
    digest = hashlib.sha256(f"{salt}\x00{value}".encode()).hexdigest()[:16].upper()
    return f"{prefix}-{digest}"


def new_uid(salt: str, uid: str) -> str:
    """The salted replacement of ``uid``: the same salt and UID always give the same new UID."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[salt, str(uid)]))


@dataclass(frozen=True)
class _Rules:
    salt: str
    patient: str
    keep_patient_characteristics: bool
    dummy_all: bool = False  # inside a sequence the table says D for: every value a dummy


def _unlisted_action(elem: Any) -> Action:
    """The action for an attribute Table E.1-1 does not list (see the module docstring)."""
    from pydicom.uid import UID_dictionary

    if not elem.keyword:
        return Action.REMOVE  # unknown public tag: nothing says what it holds
    if elem.keyword in KEEP or elem.VR in _SAFE_VRS or elem.VR == "SQ":
        return Action.KEEP
    if elem.VR == "UI":
        values = elem.value if elem.VM > 1 else [elem.value]
        known = all(str(v) in UID_dictionary for v in values if v)
        return Action.KEEP if known else Action.REMAP
    if elem.VR in _BINARY_VRS:
        return Action.EMPTY
    return Action.DUMMY  # free text, names, dates: a dummy also satisfies Type 1


def _remap(elem: Any, rules: _Rules) -> None:
    if elem.VM > 1:
        elem.value = [new_uid(rules.salt, v) for v in elem.value]
    elif elem.value:
        elem.value = new_uid(rules.salt, elem.value)


def _dummy(elem: Any, rules: _Rules) -> None:
    if elem.tag == 0x00100020:  # Patient ID: a salted pseudonym keeps a patient's studies linked
        elem.value = _pseudonym(rules.salt, rules.patient) if rules.patient else "ANONYMIZED"
    elif elem.VR == "UI":
        _remap(elem, rules)
    else:
        elem.value = dummy_value(elem.VR)


def _apply(ds: Any, elem: Any, action: Action, rules: _Rules, report: DeidReport) -> None:
    """Carry out ``action`` on ``elem`` of ``ds``; sequences kept or remapped are walked."""
    from pydicom.sequence import Sequence

    is_sq = elem.VR == "SQ"
    if action is Action.REMOVE:
        report.private_removed += elem.tag.is_private
        report.removed += not elem.tag.is_private
        del ds[elem.tag]
    elif elem.is_empty:
        return  # Z, D and U leave an empty value empty (nothing to hide, nothing to invent)
    elif action is Action.EMPTY:
        elem.value = Sequence([]) if is_sq else None
        report.emptied += 1
    elif is_sq:  # D: the items' every value a dummy; KEEP or REMAP (X/Z/U*): the same rules
        inner = replace(rules, dummy_all=True) if action is Action.DUMMY else rules
        for item in elem.value:
            _walk(item, inner, report)
    elif action is Action.DUMMY:
        _dummy(elem, rules)
        report.dummied += 1
    elif action is Action.REMAP:
        if elem.VR == "UI":
            _remap(elem, rules)
        else:
            elem.value = dummy_value(elem.VR)
        report.uids_replaced += 1


def _walk(ds: Any, rules: _Rules, report: DeidReport) -> None:
    for elem in list(ds):
        action = action_for(int(elem.tag),
                            keep_patient_characteristics=rules.keep_patient_characteristics)
        action = action or _unlisted_action(elem)
        if rules.dummy_all and action is not Action.REMOVE and elem.VR not in _SAFE_VRS:
            action = Action.REMAP if elem.VR == "UI" else Action.DUMMY
        _apply(ds, elem, action, rules, report)


def deidentify(ds: Any, *, salt: str, keep_patient_characteristics: bool = False,
               allow_burned_in: bool = False) -> tuple[Any, DeidReport]:
    """A de-identified copy of a pydicom ``Dataset`` and a report of what changed.

    Args:
        ds: the dataset (left unchanged).
        salt: secret for pseudonyms and new UIDs; the same salt maps the same patient and
            study to the same pseudonym and UIDs (keep it secret: it is the re-identification key).
        keep_patient_characteristics: keep sex, age, size, weight and the other rows Table
            E.1-1 marks K under the Retain Patient Characteristics Option.
        allow_burned_in: accept images flagged ``BurnedInAnnotation = YES``.

    Raises:
        ConfigError: empty salt. DataError: burned-in annotation not allowed.
    """
    if not salt:
        raise ConfigError("de-identification needs a non-empty secret salt")
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES" and not allow_burned_in:
        raise DataError("image has burned-in annotation (text in the pixels) that cannot be "
                        "removed here", hint=BURNED_IN_HINT)
    report = DeidReport()
    out = copy.deepcopy(ds)
    patient = str(ds.get("PatientID", "") or ds.get("PatientName", "") or "")
    _walk(out, _Rules(salt, patient, keep_patient_characteristics), report)
    _record_method(out, keep_patient_characteristics)
    if str(ds.get("BurnedInAnnotation", "")).upper() != "NO" and ds.get("Modality") in (
            "US", "SC", "OT", "XA", "ES", "XC"):
        report.warnings.append(f"{ds.get('Modality')} images often carry burned-in text and "
                               "this file does not say it has none: check the pixels")
    _fix_file_meta(ds, out)
    report.kept = sorted(e.keyword for e in out if e.keyword)
    return out, report


def _record_method(out: Any, keep_patient_characteristics: bool) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    out.PatientIdentityRemoved = "YES"
    out.LongitudinalTemporalInformationModified = "REMOVED"
    methods = [("113100", "Basic Application Confidentiality Profile")]
    if keep_patient_characteristics:
        methods.append(("113108", "Retain Patient Characteristics Option"))
    codes = []
    for value, meaning in methods:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        codes.append(item)
    out.DeidentificationMethodCodeSequence = Sequence(codes)
    out.DeidentificationMethod = f"meddx: PS3.15 {EDITION} Table E.1-1 basic profile, allow-list"


def _fix_file_meta(original: Any, out: Any) -> None:
    """A fresh file meta (only the transfer syntax and SOP class carried) and a zeroed preamble.

    Nothing else of the input's meta survives: source AE titles, private information and the
    implementation name of the sending system are left behind.
    """
    from pydicom.dataset import FileMetaDataset

    old = getattr(original, "file_meta", None)
    meta = FileMetaDataset()
    if old is not None and old.get("TransferSyntaxUID"):
        meta.TransferSyntaxUID = old.TransferSyntaxUID
    if "SOPClassUID" in out:
        meta.MediaStorageSOPClassUID = out.SOPClassUID
    if "SOPInstanceUID" in out:
        meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    out.file_meta = meta
    if hasattr(out, "preamble"):
        out.preamble = b"\x00" * 128
