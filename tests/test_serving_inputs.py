"""Uploads through a real server: ``.npy`` with the installed numpy, object arrays refused
without unpickling, and the decoded-size cap checked from the header (issue 23, points 6, 7).
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest

from meddx.serving.auth import new_api_key
from meddx.serving.settings import ServeSettings
from serving_support import live_server

SRC = Path(__file__).resolve().parents[1] / "src"


def big_rgba_png(side: int = 6300) -> bytes:
    """A real, valid RGBA PNG of ``side`` × ``side`` transparent pixels: ~150 KB on disk,
    ``side² × 4`` bytes decoded (159 MB at 6,300) — the probe's file. Compressed row by row,
    so building it never holds the decoded image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = b"\x00" + bytes(side * 4)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def npy_header_only(shape: tuple[int, ...], descr: str = "<f8") -> bytes:
    """A ``.npy`` whose header declares ``shape`` but that holds no data."""
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
    header = header.ljust(118) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode()


class _Trap:
    """Unpickling this creates a folder: proof that a pickle was (not) run."""

    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.folder,))


@pytest.fixture(scope="module")
def package(breast_npz, tmp_path_factory):
    """An untrained 28 px BreastMNIST model: reading is what is checked here."""
    from evaluation_support import untrained_package

    out = tmp_path_factory.mktemp("inputs_pkg")
    return untrained_package({"name": "breast-inputs", "data": {
        "dataset": "breastmnist", "limit": 40}}, out / "model")[0]


@pytest.fixture(scope="module")
def server(package, tmp_path_factory):
    from meddx.serving.app import create_app

    key = new_api_key("tester")
    tmp = tmp_path_factory.mktemp("inputs_srv")
    settings = ServeSettings(api_keys={"tester": key[1]}, research_use=True, warmup=False,
                             audit_log=tmp / "audit.jsonl")
    auth = {"Authorization": f"Bearer {key[0]}"}
    with live_server(create_app([package.path], settings)) as url, \
            httpx.Client(base_url=url, timeout=60, headers=auth) as client:
        yield client


def _predict(client: httpx.Client, data: bytes, name: str, ctype: str) -> httpx.Response:
    return client.post("/v1/models/breast-inputs/predict",
                       files=[("file", (name, data, ctype))])


@pytest.mark.parametrize("ctype", ["application/x-npy", "application/octet-stream"])
def test_npy_upload_is_answered_with_the_installed_numpy(server, breast_npz, ctype) -> None:
    with np.load(breast_npz) as d:
        image = d["test_images"][0]
    r = _predict(server, npy_bytes(image), "scan.npy", ctype)
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["label"] in {"malignant", "normal, benign"}


def test_npy_object_array_is_refused_without_unpickling(server, tmp_path) -> None:
    trap = tmp_path / "unpickled"
    data = npy_bytes(np.array([_Trap(trap), 1], dtype=object), allow_pickle=True)
    r = _predict(server, data, "x.npy", "application/x-npy")
    assert r.status_code == 422
    body = r.json()
    assert body["error"] == "DataError" and "Python objects" in body["message"]
    assert "numeric array" in body["hint"]
    assert not trap.exists()


def test_npy_header_over_the_pixel_cap_is_refused_before_reading(server) -> None:
    r = _predict(server, npy_header_only((100_000, 100_000)), "x.npy", "application/x-npy")
    assert r.status_code == 413 and "pixels" in r.json()["message"]


def test_npy_header_over_the_decoded_size_cap_is_413_with_a_hint(server) -> None:
    # 4,096² float64: 16.8 megapixels (under the 40 M pixel cap), 128 MiB decoded
    r = _predict(server, npy_header_only((4096, 4096)), "x.npy", "application/x-npy")
    assert r.status_code == 413
    body = r.json()
    assert "decode to 128.0 MiB" in body["message"] and "64.0 MiB" in body["message"]
    assert "8-bit" in body["hint"]


def test_corrupt_npy_header_is_422_not_500(server) -> None:
    r = _predict(server, b"\x93NUMPY\x01\x00\x10\x00{'descr': <<<", "x.npy", "application/x-npy")
    assert r.status_code == 422 and r.json()["error"] == "DataError"


def test_large_rgba_png_is_refused_by_decoded_size(server) -> None:
    png = big_rgba_png()
    assert len(png) < 400_000
    r = _predict(server, png, "big.png", "image/png")
    assert r.status_code == 413, r.text
    body = r.json()
    assert body["error"] == "PayloadTooLargeError"
    assert "151.4 MiB" in body["message"] and "channels" in body["message"]
    assert "alpha" in body["hint"]


_RSS_PROBE = """
import json, resource, sys
from meddx.errors import PayloadTooLargeError
from meddx.modalities import get_modality
from meddx.serving.inputs import Upload, check_upload
data = open(sys.argv[1], "rb").read()
modality = get_modality("image")
from PIL import Image, PngImagePlugin  # imported before measuring
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    check_upload(Upload(data, "big.png", "image/png"), modality, 40_000_000, 64 * 2**20)
    refused = False
except PayloadTooLargeError:
    refused = True
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"refused": refused, "rss_delta_kb": after - before}))
"""


def test_decoded_size_is_refused_before_decoding(tmp_path) -> None:
    """In a fresh process, the refusal of the 6,300² RGBA PNG raises peak memory by less
    than 20 MB: nothing was decoded (decoding it takes 159 MB)."""
    path = tmp_path / "big.png"
    path.write_bytes(big_rgba_png())
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(path)], env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["refused"] is True
    assert result["rss_delta_kb"] < 20_000, result


def test_dicom_decoded_size_counts_samples_bits_and_frames() -> None:
    """Rows × Columns × SamplesPerPixel × BitsAllocated/8 × NumberOfFrames, from the header."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from meddx.modalities.image.header import declared_size

    ds = Dataset()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated = 512, 256, 3, 16
    ds.NumberOfFrames = 10
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    size = declared_size(buf.getvalue(), "dicom")
    assert size.pixels == 512 * 256 * 10
    assert size.decoded_bytes == 512 * 256 * 10 * 3 * 2


def test_nifti_decoded_size_is_shape_times_dtype() -> None:
    import nibabel as nib

    from meddx.modalities.image.header import declared_size

    img = nib.Nifti1Image(np.zeros((4, 5, 6), dtype=np.float64), np.eye(4))
    size = declared_size(img.to_bytes(), "nifti")
    assert size.pixels == 120 and size.decoded_bytes == 120 * 8


def test_json_ecg_array_is_read_as_the_hint_says(tiny_ecg_package, tmp_path) -> None:
    """``{"data": [[…]], "fs": …}`` — what an ECG model's JSON hint offers — is an array for
    the ECG reader, not base64 (a ``data`` string stays a base64 file for every modality)."""
    from meddx.serving.app import create_app

    settings = ServeSettings(insecure_no_auth=True, warmup=False, research_use=True,
                             audit_log=tmp_path / "audit.jsonl")
    t = np.arange(1000) / 100.0
    trace = (np.sin(2 * np.pi * 1.2 * t)).round(4).tolist()
    with live_server(create_app([tiny_ecg_package.path], settings)) as url:
        r = httpx.post(f"{url}/v1/models/af-untrained/predict", timeout=60,
                       json={"inputs": [{"data": [trace], "fs": 100.0, "leads": ["I"]}]})
        assert r.status_code == 200, r.text
        bad = httpx.post(f"{url}/v1/models/af-untrained/predict", timeout=60,
                         json={"inputs": ["/etc/passwd"]})
    assert bad.status_code == 422
    assert "FHIR Observation" in bad.json()["hint"] and "passwd" not in bad.text
