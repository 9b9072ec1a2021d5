"""DICOM de-identification: nothing identifying survives, pixels and geometry do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from meddx.errors import ConfigError, DataError
from meddx.modalities.image.io import read_image
from meddx.privacy import deidentify, deidentify_file, deidentify_folder
from meddx.privacy.deid import KEEP

FILES = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "examples_ybr_color.dcm",
         "rtdose.dcm", "examples_palette.dcm"]


def dicom_file(name: str) -> str:
    path = pydicom.data.get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    return path


RISKY_VRS = ("PN", "DA", "DT", "TM", "LO", "SH", "LT", "ST", "UT", "UC", "AE")


def identifying_values(out: pydicom.Dataset, original: pydicom.Dataset) -> list[str]:
    """Private elements, and names, dates, times or free text of the input left in the output."""
    before = {str(e.value) for e in original.iterall()  # allow-listed text describes the device
              if e.VR in RISKY_VRS and e.value not in ("", None) and e.keyword not in KEEP}
    found = [f"{e.tag}" for e in out.iterall() if e.tag.is_private]
    for elem in out.iterall():
        if elem.VR in RISKY_VRS and str(elem.value) in before:
            found.append(f"{elem.keyword or elem.tag}={elem.value!r}")
    return found



@pytest.mark.parametrize("name", FILES)
def test_nothing_identifying_survives_and_pixels_do(name: str) -> None:
    ds = pydicom.dcmread(dicom_file(name))
    out, report = deidentify(ds, salt="s3cret")
    assert identifying_values(out, ds) == []
    for keyword in ("OtherPatientIDsSequence", "PatientAge", "PatientWeight"):
        assert keyword not in out  # X
    for keyword in ("InstitutionName", "StationName"):  # X/Z/D: a dummy, never the original
        assert ds.get(keyword) in ("", None) or out[keyword].value != ds[keyword].value
    assert "PatientSex" not in ds or out["PatientSex"].is_empty  # Z: present (Type 2), empty
    assert out.PatientIdentityRemoved == "YES"
    assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert out.StudyInstanceUID != ds.StudyInstanceUID
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    np.testing.assert_array_equal(out.pixel_array, ds.pixel_array)
    assert ds.PatientName == pydicom.dcmread(dicom_file(name)).PatientName  # input untouched


def test_pseudonyms_are_deterministic_per_salt(tmp_path: Path) -> None:
    ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
    a, _ = deidentify(ds, salt="one")
    b, _ = deidentify(ds, salt="one")
    c, _ = deidentify(ds, salt="two")
    assert a.PatientID == b.PatientID != c.PatientID
    assert a.StudyInstanceUID == b.StudyInstanceUID != c.StudyInstanceUID
    assert str(ds.PatientID) not in a.PatientID
    kept, report = deidentify(ds, salt="one", keep_patient_characteristics=True)
    assert kept.PatientSex == ds.PatientSex and "PatientAge" in kept
    assert [i.CodeValue for i in kept.DeidentificationMethodCodeSequence] == ["113100", "113108"]
    with pytest.raises(ConfigError):
        deidentify(ds, salt="")


def test_written_file_reads_back_identically(tmp_path: Path) -> None:
    src = dicom_file("CT_small.dcm")
    deidentify_file(src, tmp_path / "clean.dcm", salt="s")
    before, after = read_image(src), read_image(tmp_path / "clean.dcm")
    np.testing.assert_array_equal(before.array, after.array)
    assert after.meta["modality"] == "CT" and after.meta["spacing"] == before.meta["spacing"]
    assert b"CompressedSamples" not in (tmp_path / "clean.dcm").read_bytes()
    with pytest.raises(ConfigError, match="never overwrites"):
        deidentify_file(tmp_path / "clean.dcm", tmp_path / "clean.dcm", salt="s")


def test_burned_in_annotation_refused(tmp_path: Path) -> None:
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(DataError, match="burned-in"):
        deidentify(ds, salt="s")
    out, _ = deidentify(ds, salt="s", allow_burned_in=True)
    assert out.BurnedInAnnotation == "YES"


def test_folder_and_cli_use_uid_paths_only(tmp_path: Path) -> None:
    import typer

    from meddx.commands.privacy import register

    incoming = tmp_path / "DOE_JOHN"
    incoming.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        (incoming / name).write_bytes(Path(dicom_file(name)).read_bytes())
    (incoming / "notes.txt").write_text("not dicom")
    summary = deidentify_folder(incoming, tmp_path / "clean", salt="s")
    reports = summary.reports
    assert len(reports) == 2 and summary.count("skipped") == 1 and all("DOE" not in k for k in reports)
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a group with two commands keeps the sub-command name
    result = CliRunner().invoke(app, ["deid", str(incoming), str(tmp_path / "cli")],
                                env={"MEDDX_DEID_SALT": "s"})
    assert result.exit_code == 0, result.output
    assert "2 written, 0 refused, 1 skipped" in result.output
    assert sorted(p.name for p in (tmp_path / "cli").rglob("*.dcm")) == sorted(
        Path(k).name for k in reports)
