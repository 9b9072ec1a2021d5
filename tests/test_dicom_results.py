"""The model's answer as DICOM: a TID 1500 Comprehensive SR and heat-map Secondary Captures,
built from a real Prediction of the tiny BreastMNIST package on ultrasound DICOM, read back with
pydicom and highdicom, checked value by value, and validated with dciodvfy when present."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from conftest import IN_CI, require_data
from dicom_results_support import breast_analysis, breast_images, slide_instance, ultrasound_study
from meddx.dicom.codes import MEDDX_SCHEME, C
from meddx.dicom.results import heatmap_images, result_datasets, structured_report
from meddx.errors import ConfigError, DataError

slow = pytest.mark.slow  # the tiny package is trained once per session


@pytest.fixture(scope="module")
def study(tmp_path_factory, breast_npz) -> list[Path]:
    return ultrasound_study(breast_images(breast_npz, 3), tmp_path_factory.mktemp("us"))


@pytest.fixture(scope="module")
def analysis(tiny_breast_package, study):
    return breast_analysis(tiny_breast_package.path, study)


def _reread(ds: pydicom.Dataset, path: Path) -> pydicom.Dataset:
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def _values(group) -> tuple[dict, dict]:
    quals: dict[str, list[str]] = {}
    for q in group.get_qualitative_evaluations():
        quals.setdefault(q.name.value, []).append(q.value.value)
    nums = {m.name.value: float(m.value) for m in group.get_measurements()}
    return quals, nums


@slow
def test_sr_carries_finding_probability_decision_set_ood_and_algorithm(analysis, study, tmp_path):
    src = pydicom.dcmread(study[0])
    ds = _reread(structured_report(analysis), tmp_path / "sr.dcm")
    pred = analysis.prediction
    # the source study, the patient and study modules copied, a new series
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    for key in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                "AccessionNumber", "StudyDate", "StudyID"):
        assert str(ds[key].value) == str(src[key].value), key
    assert ds.CompletionFlag == "COMPLETE" and ds.VerificationFlag == "UNVERIFIED"
    assert MEDDX_SCHEME in [i.CodingSchemeDesignator for i in ds.CodingSchemeIdentificationSequence]
    # every analysed instance is referenced as evidence
    evidence = {i.ReferencedSOPInstanceUID: i.ReferencedSOPClassUID
                for s in ds.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert evidence == {str(pydicom.dcmread(p).SOPInstanceUID): src.SOPClassUID for p in study}

    sr = hd.sr.srread(tmp_path / "sr.dcm")
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    groups = sr.content.get_image_measurement_groups()
    main = [g for g in groups if g.finding_category.value == C.SERIES_RESULT.value]
    assert len(main) == 1
    main = main[0]
    assert main.finding_type.value == "malignant" and main.finding_type.scheme_designator == "99MEDDX"
    quals, nums = _values(main)
    assert nums[C.CALIBRATED_PROBABILITY.value] == pytest.approx(pred.risk, abs=1e-6)
    assert nums[C.THRESHOLD.value] == pytest.approx(pred.threshold, abs=1e-6)
    assert nums[C.OOD_SCORE.value] == pytest.approx(pred.ood_score, rel=1e-6)
    positive = pred.decision == "malignant"
    assert quals[C.DECISION.value] == [(C.POSITIVE if positive else C.NEGATIVE).value]
    assert quals[C.POSITIVE_CLASS.value] == ["malignant"]
    assert sorted(quals[C.CONFORMAL_MEMBER.value]) == sorted(pred.prediction_set)
    assert quals[C.OOD.value] == [(C.YES if pred.ood else C.NO).value]
    assert quals[C.REFER.value] == [(C.YES if pred.refer else C.NO).value]
    texts = {i.ConceptNameCodeSequence[0].CodeValue: i.TextValue
             for i in main[0].ContentSequence if i.ValueType == "TEXT"}
    assert texts[C.OPERATING_POINT.value] == pred.operating_point
    assert texts[C.AGGREGATION.value] == analysis.aggregation
    # the algorithm: name, version, package sha256
    algo = {i.ConceptNameCodeSequence[0].CodeValue: i.TextValue
            for i in main[0].ContentSequence if i.ValueType == "TEXT"
            and i.ConceptNameCodeSequence[0].CodingSchemeDesignator == "DCM"}
    assert algo["111001"] == analysis.algorithm.name
    assert algo["111003"] == analysis.algorithm.version
    params = [i.TextValue for i in main[0].ContentSequence if i.ValueType == "TEXT"
              and i.ConceptNameCodeSequence[0].CodeValue == "111002"]
    assert f"package_sha256={analysis.algorithm.package_sha256}" in params
    assert analysis.algorithm.package_sha256 == pred.model["sha256"]
    # per class: calibrated and raw probability
    per_class = {g.finding_type.meaning: _values(g)[1] for g in groups
                 if g.finding_category.value == C.CLASS_RESULT.value}
    assert set(per_class) == set(pred.probabilities)
    for name, p in pred.calibrated.items():
        assert per_class[name][C.CALIBRATED_PROBABILITY.value] == pytest.approx(p, abs=1e-6)
        assert per_class[name][C.PROBABILITY.value] == pytest.approx(
            pred.probabilities[name], abs=1e-6)
    # per image: its own risk, referencing its instance
    images = [g for g in groups if g.finding_category.value == C.IMAGE_RESULT.value]
    assert len(images) == len(study)
    for g, (uid, p) in zip(images, analysis.per_image, strict=True):
        assert [r.referenced_sop_instance_uid for r in g.source_images] == [uid]
        assert _values(g)[1][C.CALIBRATED_PROBABILITY.value] == pytest.approx(p.risk, abs=1e-6)


def _dciodvfy(path: Path) -> str:
    exe = shutil.which("dciodvfy")
    if exe is None:
        if IN_CI:
            pytest.fail("dciodvfy (dicom3tools) missing under CI=true")
        pytest.skip("dciodvfy (Debian dicom3tools) not installed")
    run = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return run.stdout + run.stderr


@slow
def test_results_validate_with_dciodvfy(analysis, tmp_path):
    for i, ds in enumerate(result_datasets(analysis)):
        path = tmp_path / f"r{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        errors = [line for line in _dciodvfy(path).splitlines() if line.startswith("Error")]
        assert errors == [], (ds.SOPClassUID.name, errors)


@slow
def test_heat_maps_are_blended_secondary_captures_in_the_source_study(analysis, study, tmp_path):
    src = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in study}
    sr = structured_report(analysis)
    images = [_reread(ds, tmp_path / f"sc{i}.dcm")
              for i, ds in enumerate(heatmap_images(analysis))]
    assert len(images) == len(analysis.heatmaps) == len(study)
    assert len({ds.SeriesInstanceUID for ds in images}) == 1
    assert images[0].SeriesInstanceUID not in {sr.SeriesInstanceUID,
                                               next(iter(src.values())).SeriesInstanceUID}
    for ds, (uid, _) in zip(images, analysis.heatmaps, strict=True):
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
        assert ds.StudyInstanceUID == src[uid].StudyInstanceUID
        assert ds.PatientID == src[uid].PatientID
        assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
        assert ds.BurnedInAnnotation == "YES"
        assert "not for diagnosis" in ds.DerivationDescription.lower()
        assert "not for diagnosis" in ds.SeriesDescription.lower()
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == uid
        rgb = ds.pixel_array
        assert rgb.shape[0] >= 256  # the 28×28 image enlarged so the label can be read
        band = rgb[:8, :60].astype(int)  # the burned-in label: white text on black
        assert band.min() == 0 and band.max() > 200
        assert (band[..., 0] == band[..., 2]).all()  # grey, where the heat map is colour


@slow
def test_dcmtk_renders_the_sr_as_a_readable_document(analysis, tmp_path):
    """What a reader sees in an SR viewer: dcmtk's dsrdump (Debian dcmtk, installed with
    Orthanc) renders the finding, the decision, the probability and the operating point."""
    exe = shutil.which("dsrdump")
    if exe is None:
        pytest.skip("dcmtk's dsrdump not installed")
    path = tmp_path / "sr.dcm"
    structured_report(analysis).save_as(path, enforce_file_format=True)
    run = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    pred = analysis.prediction
    for text in ('"Decision at operating point")=(', '"Calibrated probability")=',
                 f'"Operating point")="{pred.operating_point}"',
                 '"Algorithm Name")="' + analysis.algorithm.name + '"',
                 '"Finding")=(malignant,99MEDDX'):
        assert text in run.stdout, text


def test_blend_keeps_grey_where_cold_and_colours_where_hot():
    from meddx.dicom.results import blend

    grey = np.full((40, 40), 100, np.uint8)
    heat = np.zeros((40, 40))
    heat[:, 20:] = 1.0
    rgb = blend(grey, heat).astype(int)
    assert (rgb[:, :20] == 100).all()  # no heat: the image untouched
    hot = rgb[:, 20:].reshape(-1, 3)
    assert (hot[:, 0] > hot[:, 2] + 40).all()  # jet at 1.0 is red


@slow
def test_same_analysis_gives_same_uids(analysis):
    first = [str(ds.SOPInstanceUID) for ds in result_datasets(analysis)]
    again = [str(ds.SOPInstanceUID) for ds in result_datasets(analysis)]
    assert first == again and len(set(first)) == len(first)


@slow
def test_bad_sources_and_heat_maps_get_specific_errors(analysis, tmp_path, study):
    from dataclasses import replace

    other = ultrasound_study(np.zeros((1, 28, 28), np.uint8), tmp_path / "other")
    with pytest.raises(DataError, match="not in the analysed study"):
        structured_report(replace(analysis, sources=(*analysis.sources, *other)))
    text = tmp_path / "x.dcm"
    text.write_text("not dicom")
    with pytest.raises(DataError, match="cannot be read as DICOM") as e:
        structured_report(replace(analysis, sources=(text,)))
    assert e.value.hint
    with pytest.raises(ConfigError, match="not among the analysis' sources"):
        heatmap_images(replace(analysis, heatmaps=(("1.2.3.4", np.zeros((28, 28))),)))
    uid = analysis.heatmaps[0][0]
    with pytest.raises(DataError, match="NaN"):
        heatmap_images(replace(analysis, heatmaps=((uid, np.full((28, 28), np.nan)),)))
    with pytest.raises(ConfigError, match="2-D"):
        replace(analysis, heatmaps=((uid, np.zeros((2, 28, 28))),))


def test_slide_finding_is_an_sr_on_the_slide_and_attention_map_a_secondary_capture(tmp_path):
    """A whole-slide image (a tiled VL Whole Slide Microscopy level made from the bundled SVS):
    the slide-level SR references the slide instance; the attention map is blended on the
    whole pixel matrix (all tiles) as an SC in slide coordinates. The Prediction is set here:
    the writers are under test, not a pathology model."""
    from meddx.dicom.model import Algorithm, SeriesAnalysis
    from meddx.inference.prediction import Prediction

    path = slide_instance(require_data("pathology/CMU-1-Small-Region.svs"), tmp_path / "wsi")
    src = pydicom.dcmread(path)
    pred = Prediction(id="slide", probabilities={"tumour": 0.9, "normal": 0.1}, label="tumour",
                      calibrated={"tumour": 0.85, "normal": 0.15}, decision="tumour",
                      operating_point="youden", threshold=0.5, prediction_set=["tumour"],
                      ood=False, ood_score=0.2,
                      model={"name": "wsi", "version": "2", "sha256": "ef" * 32,
                             "positive_class": "tumour"})
    attention = np.zeros((20, 15))
    attention[5:10, 5:10] = 1.0  # on a coarse tile grid: resized onto the slide level
    analysis = SeriesAnalysis(
        study_uid=src.StudyInstanceUID, series_uid=src.SeriesInstanceUID, sources=(path,),
        algorithm=Algorithm("wsi", "2", "ef" * 32), prediction=pred,
        heatmaps=((str(src.SOPInstanceUID), attention),), slide=True,
        aggregation="attention-weighted mean of tile features")
    sr_ds, sc = result_datasets(analysis)
    sr_path, sc_path = tmp_path / "sr.dcm", tmp_path / "sc.dcm"
    sr_ds.save_as(sr_path, enforce_file_format=True)
    sc.save_as(sc_path, enforce_file_format=True)
    sr = hd.sr.srread(sr_path)
    (main,) = [g for g in sr.content.get_image_measurement_groups()
               if g.finding_category.value == C.SLIDE_RESULT.value]
    assert [(r.referenced_sop_class_uid, r.referenced_sop_instance_uid)
            for r in main.source_images] == [(src.SOPClassUID, src.SOPInstanceUID)]
    quals, nums = _values(main)
    assert quals[C.DECISION.value] == [C.POSITIVE.value]
    assert nums[C.CALIBRATED_PROBABILITY.value] == pytest.approx(0.85)
    assert sr.ContentSequence is not None and sr_ds.StudyInstanceUID == src.StudyInstanceUID
    back = pydicom.dcmread(sc_path)
    assert back.StudyInstanceUID == src.StudyInstanceUID and back.ContainerIdentifier == "SLIDE-1"
    rgb = back.pixel_array
    assert rgb.shape[:2] == (src.TotalPixelMatrixRows, src.TotalPixelMatrixColumns)
    # the hot square (rows 25–50 % of the slide, columns 33–67 %) is red; the tile borders of
    # a wrongly assembled matrix would not line up with it
    h, w = rgb.shape[:2]
    hot = rgb[int(0.30 * h):int(0.45 * h), int(0.38 * w):int(0.62 * w)].astype(int)
    assert (hot[..., 0] - hot[..., 2]).mean() > 60
    for p in (sr_path, sc_path):
        errors = [line for line in _dciodvfy(p).splitlines() if line.startswith("Error")]
        assert errors == [], errors
