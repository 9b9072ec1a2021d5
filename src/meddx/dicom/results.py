"""A model's answer as DICOM objects that go back into the source study (highdicom).

- :func:`structured_report` — a TID 1500 Measurement Report in a Comprehensive SR: the finding,
  calibrated probability per class, the decision with its operating point and threshold, the
  conformal set, the OOD flag, the algorithm (name, version, package sha256), references to
  every analysed instance; patient and study modules copied from the sources.
- :func:`heatmap_images` — each explanation heat map as an RGB Secondary Capture, blended on
  the source image, with the "not for diagnosis" label burned in.
- :func:`result_datasets` — both, the one call the pipeline makes.

UIDs are derived from what was analysed (study, series, instances, package sha256), so the same
analysis gives the same SOP Instance UIDs: a PACS that receives it twice stores it once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset

from meddx.dicom.codes import CODING_SCHEME, C, class_code, yes_no
from meddx.dicom.model import SeriesAnalysis
from meddx.errors import ConfigError, DataError
from meddx.inference.prediction import Prediction
from meddx.version import __version__

__all__ = ["structured_report", "heatmap_images", "result_datasets", "read_sources",
           "derived_uid", "hashed_uid", "SR_SERIES_NUMBER", "HEATMAP_SERIES_NUMBER"]

logger = logging.getLogger(__name__)

SR_SERIES_NUMBER = 9901
HEATMAP_SERIES_NUMBER = 9902
MANUFACTURER = "meddx"
NOT_FOR_DIAGNOSIS = "meddx AI heat map - NOT FOR DIAGNOSIS"
MAX_SLIDE_PIXELS = 4096 * 4096
VL_WSM = "1.2.840.10008.5.1.4.1.1.77.1.6"


def derived_uid(analysis: SeriesAnalysis, *parts: str) -> str:
    """A UID fixed by the analysed instances, the model and ``parts`` (2.25 form)."""
    return hashed_uid(analysis.study_uid, analysis.series_uid,
                      analysis.algorithm.package_sha256, *(str(p) for p in analysis.sources),
                      *parts)


def hashed_uid(*parts: str) -> str:
    """A 2.25 UID from the sha256 of ``parts`` (pydicom's ``generate_uid(prefix=None)`` is
    random whatever the entropy sources, so it cannot be used for repeatable UIDs)."""
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()
    return f"2.25.{int(digest[:32], 16)}"


def read_sources(analysis: SeriesAnalysis, pixels: bool = False) -> list[Dataset]:
    """The analysed instances' headers (with ``pixels``: whole datasets).

    Raises:
        DataError: a source is missing, not DICOM, or from another study.
    """
    out = []
    for path in analysis.sources:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
        except (OSError, pydicom.errors.InvalidDicomError) as e:
            raise DataError(f"source instance {Path(path).name} cannot be read as DICOM: {e}",
                            path=str(path), hint="results go into a DICOM study: pass the "
                            "received instance files") from e
        if getattr(ds, "StudyInstanceUID", None) != analysis.study_uid:
            raise DataError(f"source instance {Path(path).name} is not in the analysed study",
                            path=str(path), hint="one analysis covers one study")
        out.append(ds)
    return out


def _algorithm_id(analysis: SeriesAnalysis) -> hd.sr.AlgorithmIdentification:
    params = [f"package_sha256={analysis.algorithm.package_sha256}"]
    if analysis.prediction.operating_point:
        params.append(f"operating_point={analysis.prediction.operating_point}")
    return hd.sr.AlgorithmIdentification(name=analysis.algorithm.name,
                                         version=analysis.algorithm.version,
                                         parameters=params, manufacturer=MANUFACTURER)


def _num(name: hd.sr.CodedConcept, value: float) -> hd.sr.Measurement:
    if not np.isfinite(value):
        raise DataError(f"{name.meaning} is not a finite number ({value})",
                        hint="the model produced NaN/inf: check the input and the package")
    return hd.sr.Measurement(name=name, value=float(value), unit=C.NO_UNITS)


def _text(name: hd.sr.CodedConcept, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value,
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _evaluations(pred: Prediction) -> list[hd.sr.QualitativeEvaluation]:
    """Decision, conformal set, referral and OOD of one prediction."""
    q = hd.sr.QualitativeEvaluation
    out = []
    if isinstance(pred.label, str):
        out.append(q(C.PREDICTED_CLASS, class_code(pred.label)))
    positive = pred.model.get("positive_class")
    if isinstance(pred.decision, str) and positive:
        out.append(q(C.DECISION, C.POSITIVE if pred.decision == positive else C.NEGATIVE))
        out.append(q(C.POSITIVE_CLASS, class_code(positive)))
    for name in pred.prediction_set or ():
        out.append(q(C.CONFORMAL_MEMBER, class_code(name)))
    if pred.prediction_set is not None or pred.label_sets is not None:
        out.append(q(C.REFER, yes_no(pred.refer)))
        out.append(q(C.REVIEW, yes_no(pred.review)))
    if pred.ood is not None:
        out.append(q(C.OOD, yes_no(pred.ood)))
    return out


def _measurements(pred: Prediction) -> list[hd.sr.Measurement]:
    out = []
    positive = pred.model.get("positive_class")
    if isinstance(pred.label, float):
        out.append(_num(C.PREDICTED_VALUE, pred.label))
    elif pred.risk is not None and positive:
        name = C.CALIBRATED_PROBABILITY if pred.calibrated else C.PROBABILITY
        out.append(_num(name, pred.risk))
    if pred.threshold is not None:
        out.append(_num(C.THRESHOLD, pred.threshold))
    if pred.ood_score is not None:
        out.append(_num(C.OOD_SCORE, pred.ood_score))
    return out


def _group(kind: hd.sr.CodedConcept, label: str, uid: str, pred: Prediction,
           sources: list[Dataset], algo: hd.sr.AlgorithmIdentification,
           texts: dict[hd.sr.CodedConcept, str]) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    positive = pred.model.get("positive_class")
    finding = positive or (pred.label if isinstance(pred.label, str) else None)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=label),
        finding_type=class_code(finding) if finding else None,
        finding_category=kind,
        algorithm_id=algo,
        measurements=_measurements(pred) or None,
        qualitative_evaluations=_evaluations(pred) or None,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds)
                       for ds in sources],
    )
    for name, value in texts.items():
        if value:
            group[0].ContentSequence.append(_text(name, value))
    return group


def _class_groups(analysis: SeriesAnalysis, algo: hd.sr.AlgorithmIdentification
                  ) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """One group per class: its calibrated and raw probability (multilabel: its decision)."""
    pred = analysis.prediction
    if isinstance(pred.label, float):
        return []
    groups = []
    for name, p in pred.probabilities.items():
        measurements = [_num(C.PROBABILITY, p)]
        if pred.calibrated is not None:
            measurements.insert(0, _num(C.CALIBRATED_PROBABILITY, pred.calibrated[name]))
        evaluations = []
        if isinstance(pred.decision, dict) and name in pred.decision:
            evaluations.append(hd.sr.QualitativeEvaluation(
                C.DECISION, C.POSITIVE if pred.decision[name] else C.NEGATIVE))
        if pred.label_sets is not None and name in pred.label_sets:
            for member in pred.label_sets[name]:
                evaluations.append(hd.sr.QualitativeEvaluation(C.CONFORMAL_MEMBER,
                                                               class_code(member)))
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derived_uid(analysis, "class", name), identifier=f"class {name}"),
            finding_type=class_code(name), finding_category=C.CLASS_RESULT,
            algorithm_id=algo, measurements=measurements,
            qualitative_evaluations=evaluations or None))
    return groups


def _report_content(analysis: SeriesAnalysis, sources: list[Dataset]) -> hd.sr.MeasurementReport:
    algo = _algorithm_id(analysis)
    pred = analysis.prediction
    kind = C.SLIDE_RESULT if analysis.slide else C.SERIES_RESULT
    texts = {C.OPERATING_POINT: pred.operating_point or "",
             C.AGGREGATION: analysis.aggregation}
    groups = [_group(kind, "slide result" if analysis.slide else "series result",
                     derived_uid(analysis, "main"), pred, sources, algo, texts)]
    groups += _class_groups(analysis, algo)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    for sop_uid, image_pred in analysis.per_image:
        if sop_uid not in by_uid:
            raise ConfigError(f"per-image prediction for instance {sop_uid}, which is not "
                              "among the analysis' sources", hint="pass its file in sources")
        groups.append(_group(C.IMAGE_RESULT, "image result", derived_uid(analysis, "img", sop_uid),
                             image_pred, [by_uid[sop_uid]], algo,
                             {C.OPERATING_POINT: image_pred.operating_point or ""}))
    device = hd.sr.ObserverContext(
        observer_type=C.DEVICE,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hashed_uid("device", analysis.algorithm.package_sha256),
            name=analysis.algorithm.name[:64], manufacturer_name=MANUFACTURER,
            model_name=f"{analysis.algorithm.name} {analysis.algorithm.version}"[:64]))
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=C.SLIDE_PROCEDURE if analysis.slide else C.IMAGING_PROCEDURE,
        imaging_measurements=groups,
    )


def structured_report(analysis: SeriesAnalysis, *, series_number: int = SR_SERIES_NUMBER
                      ) -> Dataset:
    """The analysis as a Comprehensive SR (TID 1500) in the source study.

    Args:
        analysis: the model's answer on one series (or slide).
        series_number: Series Number of the SR series.

    Returns:
        the SR dataset (highdicom ``ComprehensiveSR``), ready to store or send.

    Raises:
        DataError: a source is unreadable or from another study, or a value is not finite.
        ConfigError: a per-image prediction names an instance not among the sources.
    """
    sources = read_sources(analysis)
    content = _report_content(analysis, sources)
    now = dt.datetime.now()
    sr = hd.sr.ComprehensiveSR(
        evidence=sources, content=content,
        series_instance_uid=derived_uid(analysis, "sr-series"), series_number=series_number,
        sop_instance_uid=derived_uid(analysis, "sr"), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        coding_schemes=[CODING_SCHEME],
        series_description=f"meddx AI result: {analysis.algorithm.name}"[:64],
        manufacturer_model_name=analysis.algorithm.name[:64],
        software_versions=f"meddx {__version__}",
        series_date=now.date(), series_time=now.time(),
    )
    return sr


def _pixels(path: Path, ds: Dataset) -> np.ndarray:
    """The image a heat map lies on: the frame of a single-frame image, the whole pixel matrix
    of a tiled whole-slide level (assembled by highdicom)."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "TotalPixelMatrixRows" in ds and frames > 1:
        size = int(ds.TotalPixelMatrixRows) * int(ds.TotalPixelMatrixColumns)
        if size > MAX_SLIDE_PIXELS:
            raise DataError(f"slide level of {size} pixels is too large to draw a heat map on",
                            path=str(path), hint="attach the attention map to the slide's "
                            "thumbnail or a low-resolution level instance")
        return np.asarray(hd.imread(path).get_total_pixel_matrix()).round().astype(np.uint8)
    arr = ds.pixel_array
    return arr[0] if frames > 1 else arr


def _grey_uint8(ds: Dataset, arr: np.ndarray) -> np.ndarray:
    """The displayed grey image (modality LUT and VOI window applied) as uint8 H×W."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if ds.get("PhotometricInterpretation", "").startswith("MONOCHROME"):
        arr = apply_voi_lut(apply_modality_lut(arr, ds), ds).astype(np.float64)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            arr = arr.max() - arr
    else:  # colour: luminance (pydicom has already turned YBR into RGB)
        rgb = arr
        arr = np.asarray(rgb, np.float64) @ np.array([0.299, 0.587, 0.114])
    lo, hi = float(np.min(arr)), float(np.max(arr))
    return np.zeros(arr.shape, np.uint8) if hi <= lo else (
        (arr - lo) / (hi - lo) * 255).round().astype(np.uint8)


def blend(grey: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The heat map (values in [0, 1], any size: resized bilinearly to the image) coloured with
    the ``jet`` map and laid over the grey image, opacity growing with the heat: RGB uint8."""
    from matplotlib import colormaps
    from scipy.ndimage import zoom

    heat = np.asarray(heat, np.float64)
    if not np.all(np.isfinite(heat)):
        raise DataError("heat map has NaN or infinite values", hint="check the explainer")
    if heat.shape != grey.shape:
        heat = zoom(heat, (grey.shape[0] / heat.shape[0], grey.shape[1] / heat.shape[1]),
                    order=1)
    heat = np.clip(heat, 0.0, 1.0)
    colour = colormaps["jet"](heat)[..., :3] * 255
    alpha = (0.6 * heat)[..., None]
    out = (1 - alpha) * grey[..., None].astype(np.float64) + alpha * colour
    return out.round().clip(0, 255).astype(np.uint8)


def _enlarge(grey: np.ndarray, min_side: int = 256) -> np.ndarray:
    """Small images enlarged (bilinear, whole factor) so the burned-in label stays legible."""
    from PIL import Image

    factor = max(1, int(np.ceil(min_side / min(grey.shape[:2]))))
    if factor == 1:
        return grey
    size = (grey.shape[1] * factor, grey.shape[0] * factor)
    return np.asarray(Image.fromarray(grey).resize(size, Image.Resampling.BILINEAR))


def _burn_label(rgb: np.ndarray, text: str = NOT_FOR_DIAGNOSIS) -> np.ndarray:
    """The label burned into the pixels, white on a black band in the top-left corner."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(rgb, "RGB")
    draw = ImageDraw.Draw(img)
    box = draw.textbbox((0, 0), text)
    draw.rectangle((0, 0, box[2] + 6, box[3] + 6), fill=(0, 0, 0))
    draw.text((3, 3), text, fill=(255, 255, 255))
    return np.asarray(img)


def _orientation(ds: Dataset) -> tuple[str, str]:
    """Patient Orientation (row, column direction letters) from Image Orientation (Patient)."""
    if "PatientOrientation" in ds and len(ds.PatientOrientation) == 2:
        return (str(ds.PatientOrientation[0]), str(ds.PatientOrientation[1]))
    iop = [float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]

    def letters(v: list[float]) -> str:
        axes = (("L", "R"), ("P", "A"), ("H", "F"))
        order = np.argsort(-np.abs(v))
        return "".join(axes[i][0 if v[i] > 0 else 1] for i in order if abs(v[i]) > 0.3)

    return letters(iop[:3]) or "L", letters(iop[3:]) or "P"


def _secondary_capture(analysis: SeriesAnalysis, path: Path, ds: Dataset, heat: np.ndarray,
                       index: int, series_number: int) -> Dataset:
    rgb = _burn_label(blend(_enlarge(_grey_uint8(ds, _pixels(path, ds))), heat))
    slide = ds.SOPClassUID == VL_WSM
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ds, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="SLIDE" if slide else "PATIENT",
        series_instance_uid=derived_uid(analysis, "heat-series"), series_number=series_number,
        sop_instance_uid=derived_uid(analysis, "heat", str(ds.SOPInstanceUID)),
        instance_number=index + 1, manufacturer=MANUFACTURER,
        patient_orientation=None if slide else _orientation(ds),
        container_identifier=str(ds.ContainerIdentifier) if slide else None,
        specimen_descriptions=[hd.SpecimenDescription.from_dataset(item) for item in
                               ds.SpecimenDescriptionSequence] if slide else None,
        series_description="meddx AI heat map - not for diagnosis",
    )
    if slide and "PatientOrientation" not in sc:  # type 2C, no patient axes on a slide
        sc.PatientOrientation = ""
    if "Laterality" in ds:  # type 2C in General Series: kept as the source has it
        sc.Laterality = ds.Laterality
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = (f"{analysis.algorithm.name} {analysis.algorithm.version} "
                                "explanation heat map blended on the source image; "
                                "not for diagnosis")[:1024]
    src = Dataset()
    src.ReferencedSOPClassUID = ds.SOPClassUID
    src.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    sc.SourceImageSequence = [src]
    return sc


def heatmap_images(analysis: SeriesAnalysis, *, series_number: int = HEATMAP_SERIES_NUMBER
                   ) -> list[Dataset]:
    """One RGB Secondary Capture per heat map, in a new series of the source study.

    Raises:
        ConfigError: a heat map names an instance that is not among the sources.
        DataError: a source is unreadable, or a heat map has non-finite values.
    """
    if not analysis.heatmaps:
        return []
    by_uid = {str(ds.SOPInstanceUID): (path, ds) for path, ds in
              zip(analysis.sources, read_sources(analysis), strict=True)}
    out = []
    for i, (sop_uid, heat) in enumerate(analysis.heatmaps):
        if sop_uid not in by_uid:
            raise ConfigError(f"heat map for instance {sop_uid}, which is not among the "
                              "analysis' sources", hint="pass its file in sources")
        path = by_uid[sop_uid][0]
        out.append(_secondary_capture(analysis, path, pydicom.dcmread(path), heat, i,
                                      series_number))
    return out


def result_datasets(analysis: SeriesAnalysis, **kwargs: Any) -> list[Dataset]:
    """The SR and the heat-map images of one analysis (what the pipeline sends)."""
    out = [structured_report(analysis)] + heatmap_images(analysis)
    logger.info("built %d result object(s) with %s %s", len(out), analysis.algorithm.name,
                analysis.algorithm.version)
    return out
