"""DICOM test data: BreastMNIST images wrapped as ultrasound DICOM, a CT series built from the
bundled CT slice, and a tiny untrained 3D package (enough to exercise the volume path)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"


def breast_images(npz: Path, n: int, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` BreastMNIST images (uint8 28×28) of a split and their labels."""
    data = np.load(npz)
    return data[f"{split}_images"][:n], data[f"{split}_labels"][:n].ravel()


def us_dataset(pixels: np.ndarray, *, study_uid: str, series_uid: str, number: int = 1,
               patient_id: str = "BRST-0001", patient_name: str = "Doe^Jane",
               accession: str = "ACC123", description: str = "Breast US") -> Dataset:
    """One 8-bit MONOCHROME2 image as a US Image Storage instance (what a modality sends)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = US_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = US_IMAGE_STORAGE
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (patient_name, patient_id,
                                                                        "19700101", "F")
    ds.AccessionNumber, ds.StudyID, ds.StudyDate, ds.StudyTime = accession, "1", "20260101", "1200"
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.Manufacturer, ds.BodyPartExamined = "US", "test", "BREAST"
    ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = 1, number, description
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    return ds


def breast_study(npz: Path, n: int, study_uid: str | None = None, start: int = 0
                 ) -> list[Dataset]:
    """``n`` BreastMNIST test images as one single-series US study."""
    images, _ = breast_images(npz, start + n)
    study, series = study_uid or generate_uid(), generate_uid()
    return [us_dataset(images[start + i], study_uid=study, series_uid=series, number=i + 1)
            for i in range(n)]


def ct_series(ct_path: Path, slices: int, study_uid: str | None = None) -> list[Dataset]:
    """A CT series of ``slices`` copies of the bundled slice, each shifted and moved along z
    (returned in shuffled order: the volume must be sorted by position, not arrival)."""
    src = dcmread(ct_path)
    study, series = study_uid or generate_uid(), generate_uid()
    base = np.asarray(src.ImagePositionPatient, float)
    out = []
    for i in range(slices):
        ds = copy.deepcopy(src)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [float(base[0]), float(base[1]), float(base[2] + 2.5 * i)]
        ds.InstanceNumber = slices - i  # numbering disagrees with position on purpose
        px = src.pixel_array.copy()
        px[:4, :4] = i  # a slice signature for the ordering test
        ds.PixelData = px.astype(src.pixel_array.dtype).tobytes()
        out.append(ds)
    rng = np.random.default_rng(0)
    return [out[i] for i in rng.permutation(slices)]


def volume_package(out: Path):
    """An untrained, seeded 3D ResNet-18 on 16³ volumes (binary)."""
    from conftest import BINARY_SPEC, _untrained_package

    spec = {"spatial_dims": 3, "channels": 1, "size": 16, "normalize": "image-minmax",
            "format": "folder", "resize": "resize", **BINARY_SPEC}
    return _untrained_package(out, "ct-volume-untrained", "image",
                              {"kind": "binary", "class_names": ["normal", "abnormal"],
                               "positive_class": "abnormal"}, "resnet18", {}, spec)


def breast_package(out: Path, name: str = "breast-tiny", ood_threshold: float = 1e6):
    """A BreastMNIST-shaped package (28×28 gray, malignant vs benign) of an untrained, seeded
    ResNet-18 whose card carries what a deployed package has: temperature, an operating point,
    a conformal threshold and an energy OOD detector (``ood_threshold`` low: everything is
    out of distribution). Training one costs minutes on a loaded 2-core machine; the DICOM
    path only needs the answer's shape, not its accuracy."""
    from conftest import BINARY_SPEC, _untrained_package
    from meddx.package import (
        Calibration,
        Conformal,
        OODDetector,
        OperatingPoint,
        load_package,
        save_package,
    )

    spec = {"spatial_dims": 2, "channels": 1, "size": 28, "normalize": "dtype-range",
            "format": "medmnist", "value_range": [0, 255], **BINARY_SPEC}
    pkg = _untrained_package(out, name, "image",
                             {"kind": "binary", "class_names": ["malignant", "benign"],
                              "positive_class": "malignant"}, "resnet18", {}, spec)
    card = pkg.card.model_copy(update={
        "calibration": Calibration(temperature=1.5),
        "operating_points": {"sensitivity@0.90": OperatingPoint(
            method="sensitivity", threshold=0.45, positive_class="malignant", target=0.9)},
        "default_operating_point": "sensitivity@0.90",
        "conformal": Conformal(threshold=0.8),
        "ood": OODDetector(method="energy", threshold=ood_threshold, false_alarm=0.05)})
    return save_package(pkg.path, pkg.build_model(), card) and load_package(pkg.path)


def receive(store, datasets: list[Dataset], now: float = 0.0) -> None:
    """What the listener does for each C-STORE: the file on disk, a row in the store."""
    for ds in datasets:
        dest = store.work / "instances" / store.study_key(str(ds.StudyInstanceUID)) / \
            f"{ds.SOPInstanceUID}.dcm"
        dest.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(dest, enforce_file_format=True)
        store.add_instance(sop_uid=str(ds.SOPInstanceUID), study_uid=str(ds.StudyInstanceUID),
                           series_uid=str(ds.SeriesInstanceUID), sop_class=str(ds.SOPClassUID),
                           path=dest, size=dest.stat().st_size, calling_ae="PACS", now=now)
