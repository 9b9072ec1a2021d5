"""`meddx deid` on real files: leaks, preamble, bad files, burned-in text, IOD validity (issue 23)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.fileset import FileSet

from conftest import IN_CI, require_data
from meddx.errors import DataError
from meddx.privacy import deidentify, deidentify_file, deidentify_folder

SRC = Path(__file__).resolve().parents[1] / "src"


def bundled(name: str) -> Path:
    return require_data(f"dicom/{name}")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The real entry point in a subprocess, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "MEDDX_DEID_SALT": "s3cret"}
    return subprocess.run([sys.executable, "-m", "meddx.cli", "deid", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_contrast_bolus_agent_does_not_leak() -> None:  # point 13
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    ds.ContrastBolusAgent = "MARKER-OMNIPAQUE-DOE"
    out, _ = deidentify(ds, salt="s")
    assert "ContrastBolusAgent" in out  # Z/D: present (Type 2 in Contrast/Bolus), dummied
    assert "MARKER" not in str(out.ContrastBolusAgent)


def test_preamble_is_zeroed(tmp_path: Path) -> None:  # point 14
    raw = bytearray(bundled("MR_small.dcm").read_bytes())
    raw[:128] = b"PATIENT DOE^JOHN 1970-01-01 MRN 12345".ljust(128, b" ")
    (tmp_path / "in.dcm").write_bytes(bytes(raw))
    deidentify_file(tmp_path / "in.dcm", tmp_path / "out.dcm", salt="s")
    written = (tmp_path / "out.dcm").read_bytes()
    assert written[:128] == b"\x00" * 128 and written[128:132] == b"DICM"
    assert b"DOE" not in written


def bad_folder(root: Path) -> Path:
    """A folder a PACS export might hold: good files around damaged ones."""
    folder = root / "DOE_JOHN"
    folder.mkdir()
    ct, mr = bundled("CT_small.dcm").read_bytes(), bundled("MR_small.dcm").read_bytes()
    (folder / "a_corrupt.dcm").write_bytes(b"\x00" * 128 + b"DICM" + os.urandom(400))
    (folder / "b_good.dcm").write_bytes(ct)
    (folder / "c_cut_in_dataset.dcm").write_bytes(mr[:700])  # inside the header elements
    (folder / "d_cut_in_pixels.dcm").write_bytes(ct[:-3000])
    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    ds.BurnedInAnnotation = "YES"
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(folder / "e_burned_in.dcm")
    raw = pydicom.dcmread(bundled("MR_small.dcm"))
    raw.SOPInstanceUID = pydicom.uid.generate_uid()
    raw.file_meta, raw.preamble = pydicom.dataset.FileMetaDataset(), None
    raw.save_as(folder / "f_no_header.dcm", enforce_file_format=False, implicit_vr=True,
                little_endian=True)  # no preamble, no DICM, no file meta
    assert (folder / "f_no_header.dcm").read_bytes()[128:132] != b"DICM"
    (folder / "g_notes.txt").write_text("not dicom")
    index = FileSet()
    index.add(pydicom.dcmread(bundled("CT_small.dcm")))
    index.write(root / "media")  # a DICOMDIR lists patient names: never copied
    shutil.copy(root / "media" / "DICOMDIR", folder / "DICOMDIR")
    (folder / "h_good.dcm").write_bytes(mr)
    return folder


def test_folder_run_refuses_bad_files_by_name_and_goes_on(tmp_path: Path) -> None:  # 15, 16
    folder = bad_folder(tmp_path)
    summary = deidentify_folder(folder, tmp_path / "out", salt="s")
    status = {o.source: (o.status, o.reason) for o in summary.outcomes}
    assert status["a_corrupt.dcm"][0] == "refused"
    assert status["c_cut_in_dataset.dcm"] == ("refused", status["c_cut_in_dataset.dcm"][1])
    assert "truncated" in status["c_cut_in_dataset.dcm"][1]
    assert status["d_cut_in_pixels.dcm"][0] == "refused"
    assert "(7FE0,0010)" in status["d_cut_in_pixels.dcm"][1]  # the pixel data element
    assert status["e_burned_in.dcm"][0] == "refused"
    assert "--allow-burned-in" in status["e_burned_in.dcm"][1]
    assert "allow_burned_in" not in status["e_burned_in.dcm"][1]
    assert status["g_notes.txt"] == ("skipped", "not DICOM")
    assert status["DICOMDIR"][0] == "skipped" and "DICOMDIR" in status["DICOMDIR"][1]
    for name in ("b_good.dcm", "f_no_header.dcm", "h_good.dcm"):
        assert status[name][0] == "written", status[name]
    written = sorted((tmp_path / "out").rglob("*"))
    files = [p for p in written if p.is_file()]
    assert len(files) == 3 and all(p.suffix == ".dcm" for p in files)  # no .part left
    for path in files:
        ds = pydicom.dcmread(path)
        ds.pixel_array  # noqa: B018 - every written image decodes
        assert ds.PatientIdentityRemoved == "YES"


@pytest.mark.slow  # two CLI subprocesses
def test_cli_summary_names_refusals_and_exits_nonzero(tmp_path: Path) -> None:  # 15, 16
    folder = bad_folder(tmp_path)
    result = run_cli(str(folder), str(tmp_path / "out"))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "3 written, 4 refused, 2 skipped" in result.stdout
    for name in ("a_corrupt.dcm", "c_cut_in_dataset.dcm", "d_cut_in_pixels.dcm",
                 "e_burned_in.dcm"):
        assert re.search(rf"refused: {name}: \S", result.stderr), result.stderr
    assert "--allow-burned-in" in result.stderr
    assert "no DICOM Part 10 header" in result.stderr  # the raw dataset is never silent
    again = run_cli(str(folder), str(tmp_path / "out2"), "--allow-burned-in")
    assert "4 written, 3 refused, 2 skipped" in again.stdout


@pytest.mark.slow  # one CLI subprocess
def test_one_bad_file_refused_not_written(tmp_path: Path) -> None:  # 15
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(bundled("CT_small.dcm").read_bytes()[:-1])  # one pixel byte short
    with pytest.raises(DataError, match="truncated"):
        deidentify_file(cut, tmp_path / "out.dcm", salt="s")
    result = run_cli(str(cut), str(tmp_path / "out.dcm"))
    assert result.returncode == 1 and "0 written, 1 refused" in result.stdout
    assert not (tmp_path / "out.dcm").exists() and list(tmp_path.glob(".*part")) == []


def dciodvfy_errors(path: Path) -> set[str]:
    """dciodvfy's Error lines (what makes a file fail its IOD)."""
    found = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return {line for line in (found.stdout + found.stderr).splitlines()
            if line.startswith("Error")}


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_output_passes_its_iod_as_the_input_does(name: str, tmp_path: Path) -> None:  # 17
    if shutil.which("dciodvfy") is None:
        message = "dciodvfy missing: `make dicom3tools` installs Debian's dicom3tools"
        pytest.fail(message) if IN_CI else pytest.skip(message)
    src = bundled(name)
    deidentify_file(src, tmp_path / "out.dcm", salt="s")
    out = pydicom.dcmread(tmp_path / "out.dcm")
    for keyword in ("PatientSex", "PositionReferenceIndicator", "PatientName", "StudyDate"):
        assert keyword in out, keyword  # Type 2: present (empty or dummy), never deleted
    assert dciodvfy_errors(tmp_path / "out.dcm") - dciodvfy_errors(src) == set()


def test_library_warnings_never_carry_patient_data_out(tmp_path: Path, capfd, caplog,
                                                       recwarn) -> None:  # privacy
    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    ds.StudyInstanceUID = "1.2.DOE.JOHN"  # invalid UI: pydicom warns and logs the value
    ds.add_new(0x00291010, "UN", b"DOE^JOHN 19700101")  # a private value of unknown VR
    ds.save_as(tmp_path / "in.dcm")
    caplog.set_level("DEBUG")
    caplog.clear(), capfd.readouterr(), recwarn.clear()  # what building the file said
    deidentify_folder(tmp_path, tmp_path.parent / f"{tmp_path.name}-out", salt="s")
    out, err = capfd.readouterr()
    assert "DOE" not in out + err + caplog.text
    assert [str(w.message) for w in recwarn if "DOE" in str(w.message)] == []

