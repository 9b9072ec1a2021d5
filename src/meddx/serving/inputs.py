"""Checks on uploaded inputs before any decoder sees them.

* the declared content type must be one the model's modality reads (else 415), and must agree
  with what the bytes are (magic numbers), so a renamed file is caught early;
* an image's pixel count is read from its header only (PNG/JPEG via Pillow's lazy open, DICOM
  without pixel data, NIfTI header, ``.npy`` header) and compared with the cap before decoding,
  so a decompression bomb is refused with 413 and never expanded.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
from dataclasses import dataclass

from meddx.errors import DataError, PayloadTooLargeError

__all__ = ["Upload", "UnsupportedMediaTypeError", "check_upload", "sniff",
           "IMAGE_TYPES"]

logger = logging.getLogger(__name__)


class UnsupportedMediaTypeError(DataError):
    """A content type the model cannot read (HTTP 415)."""

    status_code = 415


@dataclass
class Upload:
    """One uploaded input: its bytes, the client's file name and declared content type."""

    data: bytes
    name: str | None
    content_type: str | None


IMAGE_TYPES = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/dicom": "dicom",
    "application/octet-stream": None,  # any of the below, by magic number
    "application/gzip": "gzip",
    "application/x-gzip": "gzip",
    "application/x-nifti": "nifti",
    "application/x-npy": "npy",
}
TEXT_TYPES = {"text/plain", "text/csv", "application/json", "application/fhir+json",
              "application/octet-stream"}


def sniff(data: bytes) -> str | None:
    """What the bytes are by their magic number: png, jpeg, dicom, gzip, npy, nifti or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(b"\x1f\x8b"):
        return "gzip"
    if data.startswith(b"\x93NUMPY"):
        return "npy"
    if len(data) >= 348 and data[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    return None


def _base_type(content_type: str | None) -> str:
    return (content_type or "application/octet-stream").split(";")[0].strip().lower()


def check_upload(upload: Upload, modality: str, max_pixels: int,
                 accepted: set[str] | None = None) -> int | None:
    """Content type and (for images) dimension checks before decoding.

    Args:
        upload: the input.
        modality: the model's modality name.
        max_pixels: largest accepted number of pixels (voxels × frames).
        accepted: content types the modality reads (default: images, or text-like types).

    Returns:
        The pixel count the image header declares (None when unknown or not an image).

    Raises:
        UnsupportedMediaTypeError: the content type is not one the model reads.
        DataError: the bytes are not what the content type says.
        PayloadTooLargeError: the image header declares more than ``max_pixels``.
    """
    ctype = _base_type(upload.content_type)
    if modality != "image":
        allowed = accepted or TEXT_TYPES
        if ctype not in allowed and not ctype.startswith("text/"):
            raise UnsupportedMediaTypeError(
                f"content type {ctype} is not read by {modality} models",
                hint=f"send one of: {', '.join(sorted(allowed))}")
        return None
    allowed = accepted or set(IMAGE_TYPES)
    if ctype not in allowed:
        raise UnsupportedMediaTypeError(
            f"content type {ctype} is not an image format this model reads",
            hint="send PNG, JPEG, DICOM (application/dicom), NIfTI or .npy")
    kind = sniff(upload.data)
    expected = IMAGE_TYPES.get(ctype)
    if expected is not None and kind != expected and not (expected == "nifti" and kind == "gzip"):
        raise DataError(f"the upload is declared {ctype} but its bytes are "
                        f"{kind or 'not a known image format'}",
                        hint="check the file; it may be truncated or mislabelled")
    if kind is None and ctype == "application/octet-stream":
        lower = (upload.name or "").lower()
        if not lower.endswith((".npy", ".nii", ".nii.gz", ".dcm", ".png", ".jpg", ".jpeg")):
            raise UnsupportedMediaTypeError("the upload is not a known image format",
                                            hint="send PNG, JPEG, DICOM, NIfTI or .npy")
    pixels = declared_pixels(upload.data, kind)
    if pixels is not None and pixels > max_pixels:
        raise PayloadTooLargeError(
            f"the image declares {pixels:,} pixels; the limit is {max_pixels:,}",
            hint="downsample the image before sending it")
    return pixels


def declared_pixels(data: bytes, kind: str | None) -> int | None:
    """Pixel (voxel) count from the header alone; None when the format keeps it elsewhere."""
    try:
        if kind in ("png", "jpeg"):
            return _pil_pixels(data)
        if kind == "dicom":
            return _dicom_pixels(data)
        if kind == "npy":
            return _npy_pixels(data)
        if kind in ("nifti", "gzip"):
            return _nifti_pixels(data)
    except PayloadTooLargeError:
        raise
    except Exception as e:  # noqa: BLE001 — any header failure is a corrupt input
        raise DataError(f"cannot read the {kind} header: {e}",
                        hint="the file is truncated or corrupt") from e
    return None


def _pil_pixels(data: bytes) -> int:
    from PIL import Image

    if data.startswith(b"\x89PNG") and len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big") * int.from_bytes(data[20:24], "big")
    try:
        with Image.open(io.BytesIO(data)) as im:  # lazy: reads the header only
            w, h = im.size
            frames = getattr(im, "n_frames", 1)
    except Image.DecompressionBombError as e:
        raise PayloadTooLargeError("the image declares more pixels than allowed",
                                   hint="downsample the image before sending it") from e
    return int(w) * int(h) * int(frames)


def _dicom_pixels(data: bytes) -> int | None:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=False)
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if rows is None or cols is None:
        return None
    return int(rows) * int(cols) * int(ds.get("NumberOfFrames", 1) or 1)


def _npy_pixels(data: bytes) -> int:
    import numpy as np

    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    shape, _, _ = np.lib.format._read_array_header(f, version)  # header only
    return int(math.prod(shape))


def _nifti_pixels(data: bytes) -> int | None:
    import nibabel as nib

    raw = data
    if data.startswith(b"\x1f\x8b"):
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as g:
            raw = g.read(352)  # only the header is inflated
    if len(raw) < 348:
        raise DataError("NIfTI header is truncated")
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:348]), check=False)
    return int(math.prod(int(d) for d in header.get_data_shape()))
