"""Nothing an upload holds reaches the server's log or the audit log (issue 23, point 1).

The real ``meddx serve`` runs as a subprocess serving a model of every modality; malformed
files of every input format it takes — DICOM, PNG, JPEG, NIfTI, ``.npy``/``.npz``, WFDB,
FASTA, SMILES, EHR JSON, slides — each carry a planted marker in their patient fields or
payload. After the uploads the server is stopped and its whole stdout/stderr and the audit
log are searched for the marker. Before :mod:`meddx.redaction`, pydicom's warning about a
Transfer Syntax UID of the wrong length wrote ~570 raw bytes of the file (patient name, ID,
birth date) into the log, twice per upload.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from pathology_model_support import untrained_slide_package

pytestmark = pytest.mark.slow

MARK = "ZZPHIMARK"
SRC = Path(__file__).resolve().parents[1] / "src"


# ------------------------------------------------------------------------------ files
def dicom_bad_transfer_syntax() -> bytes:
    """A CT instance with the marker in every patient field whose Transfer Syntax UID
    element declares 400 bytes (the probe's case: pydicom quotes the following bytes)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.PatientName = f"{MARK}^JANE"
    ds.PatientID = f"{MARK}-ID"
    ds.PatientBirthDate = "19700101"
    ds.AccessionNumber = f"{MARK}ACC"[:16]
    ds.InstitutionName = f"{MARK} HOSPITAL"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(64)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = bytearray(buf.getvalue())
    at = data.find(b"\x02\x00\x10\x00UI")
    data[at + 6:at + 8] = (400).to_bytes(2, "little")
    return bytes(data)


def dicom_bad_values() -> bytes:
    """Values that break their VR (pydicom warns quoting them), pixel data cut short."""
    data = bytearray(dicom_bad_transfer_syntax())
    at = data.find(b"\x02\x00\x10\x00UI")
    data[at + 6:at + 8] = (20).to_bytes(2, "little")  # a valid header again
    text = bytes(data).replace(b"19700101", MARK[:8].encode())  # DA: not a date
    return text[:-40]


def _png_chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def png_bad() -> bytes:
    """Marker in text chunks (one with a wrong CRC), IDAT truncated."""
    ihdr = struct.pack(">IIBBBBB", 64, 64, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"tEXt", b"Patient\x00" + MARK.encode())
            + _png_chunk(b"iTXt", b"Name\x00\x00\x00\x00\x00" + MARK.encode(), crc=1)
            + _png_chunk(b"IDAT", zlib.compress(bytes(64 * 65))[:20]))


def jpeg_bad() -> bytes:
    """SOI, a comment and an EXIF block holding the marker, then garbage."""
    comment = MARK.encode() * 3
    exif = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08" + MARK.encode() * 4
    return (b"\xff\xd8\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
            + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif
            + b"\xff\xdb\x00\x43\x00" + MARK.encode() * 5)


def nifti_bad() -> bytes:
    """A NIfTI-1 header with the marker in descrip/aux_file, a dimension that lies, data cut."""
    import nibabel as nib

    img = nib.Nifti1Image(np.zeros((4, 4, 4), dtype=np.int16), np.eye(4))
    img.header["descrip"] = MARK.encode()
    img.header["aux_file"] = MARK.encode()[:23]
    raw = bytearray(img.to_bytes())
    raw[42:44] = (30000).to_bytes(2, "little")  # dim[1]: far more than the bytes hold
    return bytes(raw[:400])


def npy_bad_header() -> bytes:
    header = "{'descr': '<u1', 'fortran_order': False, 'shape': (8, 8), '" + MARK + "': 1, }"
    header = header.ljust(118) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(10)


def npy_object_array() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([MARK, {"name": MARK}], dtype=object), allow_pickle=True)
    return buf.getvalue()


def npz_bad() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"{MARK}.npy", npy_bad_header())
    return buf.getvalue()[:-30]


def wfdb_bad() -> list[tuple[str, bytes, str]]:
    hea = (f"{MARK} 1 100 1000\n{MARK}.dat 16 200 12 0 0 0 0 {MARK}\n"
           f"# {MARK} age 70\n").encode()
    return [("rec.hea", hea, "application/octet-stream"),
            ("rec.dat", MARK.encode() * 3, "application/octet-stream")]


def ehr_bundle_bad() -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Patient", "id": MARK,
                      "name": [{"family": MARK}], "birthDate": MARK}},
        {"resource": {"resourceType": "Observation", "status": "final",
                      "subject": {"reference": f"Patient/{MARK}"},
                      "code": {"coding": [{"system": "http://loinc.org", "code": MARK}]},
                      "effectiveDateTime": MARK,
                      "valueQuantity": {"value": MARK, "unit": MARK}}}]}


def tiff_bad() -> bytes:
    """A TIFF whose ImageDescription holds the marker and whose strips point nowhere."""
    desc = (MARK + "\x00").encode()
    entries = [(256, 3, 1, 4096), (257, 3, 1, 4096), (258, 3, 1, 8), (262, 3, 1, 1),
               (270, 2, len(desc), 8 + 2 + 12 * 7 + 4), (273, 4, 1, 10_000_000),
               (279, 4, 1, 4096 * 4096)]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        ifd += struct.pack("<HHII", tag, typ, count, value)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00\x00\x00\x00" + desc


# ----------------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def packages(breast_npz, tiny_sequence_package, tiny_molecule_package,
             tiny_ecg_package, tmp_path_factory) -> dict[str, Any]:
    """One untrained package per modality: what is checked here happens before the network."""
    from evaluation_support import untrained_package
    from icu_support import icu_package

    out = tmp_path_factory.mktemp("privacy_pkgs")
    image, _ = untrained_package({"name": "breast-untrained", "data": {
        "dataset": "breastmnist", "limit": 40}}, out / "image")
    return {"image": image, "sequence": tiny_sequence_package,
            "molecule": tiny_molecule_package, "ecg": tiny_ecg_package,
            "ehr": icu_package(out / "icu", {}, default=None),
            "pathology": _slide_package(out / "slides")}


def _slide_package(out: Path) -> Any:
    return untrained_slide_package(out, max_tiles=64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(packages, tmp_path_factory):
    """``meddx serve`` in a subprocess; yields (base URL, names by modality, folder); the
    server is stopped before the module's tests read its output."""
    tmp = tmp_path_factory.mktemp("privacy_srv")
    port = _free_port()
    args = [sys.executable, "-m", "meddx.cli", "serve",
            *[str(p.path) for p in packages.values()], "--insecure-no-auth",
            "--port", str(port), "--research-use", "--audit-log", str(tmp / "audit.jsonl"),
            "--job-dir", str(tmp / "jobs"), "--max-slide-mb", "50"]
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONWARNINGS": "default", "OMP_NUM_THREADS": "1"}
    with (tmp / "stdout.txt").open("wb") as out, (tmp / "stderr.txt").open("wb") as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err, env=env, cwd=tmp)
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(proc, base, tmp)
            names = {m: p.card.name for m, p in packages.items()}
            yield base, names, tmp, proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _wait_ready(proc: subprocess.Popen, base: str, tmp: Path) -> None:
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("meddx serve exited: " + (tmp / "stderr.txt").read_text())
        try:
            if httpx.get(f"{base}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("meddx serve did not become ready")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _uploads() -> list[tuple[str, str, dict[str, Any]]]:
    """(modality, what, httpx keyword arguments) of every malformed upload."""
    b64 = base64.b64encode
    dcm = dicom_bad_transfer_syntax()
    return [
        ("image", "DICOM, wrong Transfer Syntax length",
         {"files": [("file", ("x.dcm", dcm, "application/dicom"))]}),
        ("image", "DICOM as octet-stream", {"files": [("file", ("x", dcm,
                                                                 "application/octet-stream"))]}),
        ("image", "DICOM, bad values, cut pixel data",
         {"files": [("file", ("y.dcm", dicom_bad_values(), "application/dicom"))]}),
        ("image", "DICOM in a FHIR Binary", {"json": {
            "resourceType": "Binary", "contentType": "application/dicom",
            "data": b64(dcm).decode()}}),
        ("image", "PNG", {"files": [("file", ("x.png", png_bad(), "image/png"))]}),
        ("image", "JPEG", {"files": [("file", ("x.jpg", jpeg_bad(), "image/jpeg"))]}),
        ("image", "NIfTI", {"files": [("file", ("x.nii", nifti_bad(), "application/x-nifti"))]}),
        ("image", ".npy header", {"files": [("file", ("x.npy", npy_bad_header(),
                                                      "application/x-npy"))]}),
        ("image", ".npy object array", {"json": {"inputs": [{
            "data": b64(npy_object_array()).decode(), "contentType": "application/x-npy",
            "name": "x.npy"}]}}),
        ("image", ".npz", {"files": [("file", ("x.npz", npz_bad(), "application/zip"))]}),
        ("ecg", "WFDB", {"files": [("file", (n, d, t)) for n, d, t in wfdb_bad()]}),
        ("ecg", "ECG CSV", {"files": [("file", ("x.csv", f"I\n{MARK}\n1,2\n".encode(),
                                                "text/csv"))]}),
        ("sequence", "FASTA", {"json": f">{MARK}\nACGT{MARK}"}),
        ("sequence", "FASTA file", {"files": [("file", ("x.fa", f">{MARK}\n{MARK}\n".encode(),
                                                        "text/plain"))]}),
        ("molecule", "SMILES", {"json": {"inputs": [f"C1CC({MARK}", f"c1cc{MARK}cc1", "C(C)(C)(C)(C)C"]}}),
        ("molecule", "SMILES file", {"files": [("file", ("x.smi", f"C1CC({MARK}\n".encode(),
                                                         "text/plain"))]}),
        ("ehr", "FHIR Bundle", {"json": ehr_bundle_bad()}),
        ("ehr", "FHIR Bundle as text", {"json": json.dumps(ehr_bundle_bad())[:-5]}),
        ("ehr", "PhysioNet stay file", {"files": [("file", ("s.txt", (
            f"Time,Parameter,Value\n00:00,RecordID,{MARK}\n00:30,HR,{MARK}\n").encode(),
            "text/plain"))]}),
    ]


def cds_prefetch_bundle() -> dict[str, Any]:
    """Every kind of resource a CDS service may take, each malformed and marked."""
    dcm = base64.b64encode(dicom_bad_transfer_syntax()).decode()
    png = base64.b64encode(png_bad()).decode()
    bundle = ehr_bundle_bad()
    bundle["entry"] += [
        {"resource": {"resourceType": "Media", "id": MARK, "status": "completed",
                      "createdDateTime": "2024-05-01",
                      "content": {"contentType": "application/dicom", "data": dcm,
                                  "title": MARK}}},
        {"resource": {"resourceType": "DocumentReference", "status": "current",
                      "description": MARK,
                      "content": [{"attachment": {"contentType": "image/png", "data": png,
                                                  "title": MARK}}]}},
    ]
    return bundle


def _cds_calls(client: httpx.Client) -> dict[str, int]:
    """Every CDS service called with the malformed prefetch in each of its keys."""
    out = {}
    for service in client.get("/cds-services").json()["services"]:
        prefetch = {key: cds_prefetch_bundle() for key in service.get("prefetch", {})}
        body = {"hook": service["hook"], "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
                "context": {"userId": "Practitioner/1", "patientId": MARK}, "prefetch": prefetch}
        out[f"CDS {service['id']}"] = client.post(f"/cds-services/{service['id']}",
                                                 json=body).status_code
    return out


def test_no_marker_reaches_the_server_log_or_the_audit_log(served) -> None:
    base, names, tmp, proc = served
    statuses = {}
    with httpx.Client(base_url=base, timeout=60) as client:
        for modality, what, kwargs in _uploads():
            r = client.post(f"/v1/models/{names[modality]}/predict", **kwargs)
            statuses[what] = r.status_code
        for what, body in (("slide", tiff_bad()), ("slide, garbage", b"II*\x00" + MARK.encode() * 50)):
            r = client.post(f"/v1/models/{names['pathology']}/jobs?filename=s.tiff",
                            content=body, headers={"Content-Type": "application/octet-stream"})
            statuses[what] = r.status_code
        cds = _cds_calls(client)
        assert client.get("/health/live").status_code == 200
    _stop(proc)
    assert all(400 <= s < 500 for s in statuses.values()), statuses
    assert len(cds) >= 2 and all(s in (200, 422) for s in cds.values()), cds
    logs = {name: (tmp / name).read_bytes() for name in ("stdout.txt", "stderr.txt",
                                                         "audit.jsonl")}
    assert logs["audit.jsonl"], "the audit log recorded the refusals"
    for name, text in logs.items():
        # Rich wraps long lines: search with every space and line break taken out
        flat = re.sub(rb"\s+", b"", text)
        assert MARK[:5].encode() not in flat, f"{name} holds the marker:\n" + text.decode(
            "utf-8", "replace")[-3000:]
    # the withheld messages are still visible as events, without their text
    assert b"pydicom" in logs["stderr.txt"] and b"withheld" in logs["stderr.txt"]
