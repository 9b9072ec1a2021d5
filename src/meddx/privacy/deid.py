"""DICOM de-identification by allow-list, in the spirit of PS3.15 Annex E (basic profile).

The Basic Application Level Confidentiality Profile lists attributes to remove, blank or
replace. A deny-list misses what it does not list (free text, private tags, new attributes),
so meddx does the stricter thing: it keeps only attributes on an allow-list — what is needed
to decode and interpret the pixels (Image Pixel module, modality/VOI LUTs, geometry,
acquisition technique) — and drops everything else, private tags included. On top:

* UIDs (study, series, instance, frame of reference) are replaced by deterministic UIDs derived
  from a secret salt, so images of one study stay together and nothing links back;
* Patient ID becomes a salted pseudonym; Type 2 attributes a valid file needs (PatientName,
  StudyDate, AccessionNumber …) are present and empty;
* ``PatientIdentityRemoved = YES`` and ``DeidentificationMethodCodeSequence`` (DCM 113100
  Basic Application Confidentiality Profile; 113108 when patient characteristics are kept)
  record what was done;
* burned-in annotation is refused unless ``allow_burned_in``: pixel text cannot be cleaned here.

This is not a certified de-identifier; review the output before releasing data.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meddx.errors import ConfigError, DataError

__all__ = ["DeidReport", "deidentify", "deidentify_file", "deidentify_folder", "KEEP"]

logger = logging.getLogger(__name__)

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
_CHARACTERISTICS = frozenset({"PatientSex", "PatientAge", "PatientSize", "PatientWeight"})

KEEP = frozenset(" ".join((_PIXELS, _LUTS, _GEOMETRY, _IMAGE, _TECHNIQUE)).split())
_REMAP_UIDS = frozenset({"SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                         "FrameOfReferenceUID"})
_TYPE2_EMPTY = ("PatientName", "PatientBirthDate", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")


@dataclass
class DeidReport:
    """What :func:`deidentify` did to one dataset."""

    removed: int = 0
    private_removed: int = 0
    uids_replaced: int = 0
    kept: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _pseudonym(salt: str, value: str, prefix: str = "MDX") -> str:
    digest = hashlib.sha256(f"{salt}\x00{value}".encode()).hexdigest()[:16].upper()
    return f"{prefix}-{digest}"


def _new_uid(salt: str, uid: str) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[salt, str(uid)]))


def _filter(ds: Any, keep: frozenset[str], salt: str, report: DeidReport) -> None:
    """Drop every element whose keyword is not in ``keep``; recurse into kept sequences."""
    for elem in list(ds):
        keyword = elem.keyword
        if elem.tag.is_private or not keyword or keyword not in keep:
            if elem.tag.is_private:
                report.private_removed += 1
            else:
                report.removed += 1
            del ds[elem.tag]
            continue
        if elem.VR == "SQ":
            for item in elem.value:
                _filter(item, keep, salt, report)
        elif keyword in _REMAP_UIDS and elem.value:
            elem.value = _new_uid(salt, elem.value)
            report.uids_replaced += 1


def deidentify(ds: Any, *, salt: str, keep_patient_characteristics: bool = False,
               allow_burned_in: bool = False) -> tuple[Any, DeidReport]:
    """A de-identified copy of a pydicom ``Dataset`` and a report of what changed.

    Args:
        ds: the dataset (left unchanged).
        salt: secret for pseudonyms and new UIDs; the same salt maps the same patient and
            study to the same pseudonym and UIDs (keep it secret: it is the re-identification key).
        keep_patient_characteristics: keep sex, age, size and weight (PS3.15 "Retain Patient
            Characteristics Option"), e.g. for subgroup analysis.
        allow_burned_in: accept images flagged ``BurnedInAnnotation = YES``.

    Raises:
        ConfigError: empty salt. DataError: burned-in annotation not allowed.
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    if not salt:
        raise ConfigError("de-identification needs a non-empty secret salt")
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES" and not allow_burned_in:
        raise DataError("image has burned-in annotation (text in the pixels) that cannot be "
                        "removed here", hint="mask it first, or pass allow_burned_in=True")
    report = DeidReport()
    out = copy.deepcopy(ds)
    patient = str(ds.get("PatientID", "") or ds.get("PatientName", "") or "")
    keep = KEEP | (_CHARACTERISTICS if keep_patient_characteristics else frozenset())
    _filter(out, keep, salt, report)
    out.PatientID = _pseudonym(salt, patient) if patient else ""
    for keyword in _TYPE2_EMPTY:
        setattr(out, keyword, "")
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
    out.DeidentificationMethod = "meddx allow-list de-identification (PS3.15 Annex E basis)"
    if str(ds.get("BurnedInAnnotation", "")).upper() != "NO" and ds.get("Modality") in (
            "US", "SC", "OT", "XA", "ES", "XC"):
        report.warnings.append(f"{ds.get('Modality')} images often carry burned-in text and "
                               "this file does not say it has none: check the pixels")
    _fix_file_meta(out, salt)
    report.kept = sorted(e.keyword for e in out if e.keyword)
    return out, report


def _fix_file_meta(ds: Any, salt: str) -> None:
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return
    if "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                    "ReceivingApplicationEntityTitle", "PrivateInformation",
                    "PrivateInformationCreatorUID"):
        if keyword in meta:
            delattr(meta, keyword)


def deidentify_file(src: str | Path, dst: str | Path, *, salt: str, **options: Any
                    ) -> DeidReport:
    """De-identify one DICOM file into ``dst`` (never in place)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ConfigError("de-identification never overwrites its input", path=str(src))
    try:
        ds = pydicom.dcmread(src)
    except (InvalidDicomError, OSError, EOFError, ValueError) as e:
        raise DataError(f"not a readable DICOM file ({e})", path=str(src)) from e
    out, report = deidentify(ds, salt=salt, **options)
    dst.parent.mkdir(parents=True, exist_ok=True)
    out.save_as(dst, enforce_file_format=True)
    return report


def deidentify_folder(src: str | Path, dst: str | Path, *, salt: str, **options: Any
                      ) -> dict[str, DeidReport]:
    """De-identify every DICOM Part 10 file under ``src`` into ``dst``.

    Output paths are built from the new UIDs only — ``<study>/<series>/<instance>.dcm`` —
    because input folder and file names often hold names or ids. Other files are skipped.
    """
    import pydicom

    src, dst = Path(src), Path(dst)
    if dst.resolve().is_relative_to(src.resolve()):
        raise ConfigError("the output folder must not be inside the input folder", path=str(dst))
    reports: dict[str, DeidReport] = {}
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        with path.open("rb") as f:
            head = f.read(132)
        if head[128:132] != b"DICM":
            logger.info("skipped a file that is not DICOM Part 10")
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        parts = [_new_uid(salt, str(ds.get(k, "") or path.name))
                 for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
        target = dst / parts[0] / parts[1] / f"{parts[2]}.dcm"
        reports[str(target.relative_to(dst))] = deidentify_file(path, target, salt=salt,
                                                                **options)
    return reports
