"""DICOM studies and real model answers for the DICOM result and delivery tests.

``ultrasound_study`` wraps BreastMNIST test images as an Ultrasound DICOM study (what an
ultrasound scanner would send); ``breast_analysis`` runs the tiny trained BreastMNIST package on
it (a real Prediction with calibration, operating point, conformal set and heat map) and packs
the answer as the :class:`~meddx.dicom.model.SeriesAnalysis` the writers take.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"


def ultrasound_study(images: np.ndarray, folder: Path, *, patient_id: str = "MEDDX-TEST-1",
                     patient_name: str = "Test^Patient", accession: str = "ACC0001"
                     ) -> list[Path]:
    """Write each H×W uint8 image as one instance of one US series of one new study."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    now = dt.datetime.now()
    paths = []
    for i, img in enumerate(images):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = US_IMAGE_STORAGE
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = US_IMAGE_STORAGE, ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID = patient_name, patient_id
        ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
        ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = accession, "1", ""
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.Modality, ds.BodyPartExamined, ds.Laterality = "US", "BREAST", "L"
        ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = "meddx-test", 1, i + 1
        ds.PatientOrientation = ["A", "F"]
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = img.shape
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.PixelData = np.ascontiguousarray(img, dtype=np.uint8).tobytes()
        path = folder / f"us{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def breast_images(npz: Path, n: int, start: int = 0) -> np.ndarray:
    with np.load(npz) as z:
        return z["test_images"][start:start + n]


def breast_analysis(package_path: Path, paths: list[Path]):
    """The tiny BreastMNIST package's answer on a US study, as a SeriesAnalysis: per image a
    Prediction and a Grad-CAM heat map, the series answer the most suspicious image's."""
    from meddx.dicom.model import Algorithm, SeriesAnalysis
    from meddx.inference import load_model

    predictor = load_model(package_path)
    preds = predictor.predict([str(p) for p in paths], explain=True)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    uids = [str(h.SOPInstanceUID) for h in headers]
    worst = max(range(len(preds)), key=lambda i: preds[i].risk or 0.0)
    return SeriesAnalysis(
        study_uid=str(headers[0].StudyInstanceUID), series_uid=str(headers[0].SeriesInstanceUID),
        sources=tuple(paths), algorithm=Algorithm.from_predictor(predictor),
        prediction=preds[worst], per_image=tuple(zip(uids, preds, strict=True)),
        heatmaps=tuple((u, p.explanation) for u, p in zip(uids, preds, strict=True)
                       if p.explanation is not None),
        aggregation="series answer = the image with the highest calibrated risk")


VL_WSM_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.6"


def slide_instance(svs: Path, folder: Path, *, downsample: int = 8, tile: int = 128) -> Path:
    """A low-resolution level of the bundled SVS slide as one tiled (TILED_FULL) VL Whole Slide
    Microscopy instance: what a DICOM slide scanner sends for its smallest pyramid level."""
    import tiffslide
    from pydicom.sequence import Sequence

    with tiffslide.TiffSlide(str(svs)) as slide:
        w, h = slide.dimensions
        mpp = float(slide.properties.get("tiffslide.mpp-x") or 0.5)
        img = np.asarray(slide.get_thumbnail((w // downsample, h // downsample)).convert("RGB"))
    rows, cols = -(-img.shape[0] // tile), -(-img.shape[1] // tile)
    padded = np.full((rows * tile, cols * tile, 3), 255, np.uint8)
    padded[:img.shape[0], :img.shape[1]] = img
    frames = [padded[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
              for r in range(rows) for c in range(cols)]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = VL_WSM_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = VL_WSM_STORAGE, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Slide^Test", "S1", "", ""
    ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "ACC-S1", "1", ""
    now = dt.datetime.now()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDateTime = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = "SM", "meddx-test", 1, 1
    ds.ImageType = ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    ds.ContainerIdentifier = "SLIDE-1"
    ds.IssuerOfTheContainerIdentifierSequence = []
    ds.ContainerTypeCodeSequence = [_code("433466003", "SCT", "Microscope slide")]
    spec = Dataset()
    spec.SpecimenIdentifier, spec.SpecimenUID = "SPEC-1", generate_uid()
    spec.IssuerOfTheSpecimenIdentifierSequence = []
    spec.SpecimenPreparationSequence = []
    ds.SpecimenDescriptionSequence = [spec]
    optical = Dataset()
    optical.OpticalPathIdentifier = "1"
    optical.IlluminationTypeCodeSequence = [_code("111744", "DCM", "Brightfield illumination")]
    optical.IlluminationColorCodeSequence = [_code("11744", "DCM", "Full Spectrum")]
    ds.OpticalPathSequence = [optical]
    ds.NumberOfOpticalPaths = 1
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = img.shape[:2]
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.NumberOfFrames, ds.Rows, ds.Columns = len(frames), tile, tile
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 20, 40
    ds.TotalPixelMatrixOriginSequence = [origin]
    spacing = mpp * downsample / 1000
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = img.shape[1] * spacing, img.shape[0] * spacing
    ds.ImagedVolumeDepth = 0.001
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = [spacing, spacing], 0.001
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PixelData = np.stack(frames).tobytes()
    path = folder / "slide.dcm"
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c
