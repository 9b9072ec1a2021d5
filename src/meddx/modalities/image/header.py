"""What an uploaded image declares, read from its header before any decoder runs.

The service compares these figures with its caps, so a decompression bomb — a tiny file that
declares a huge image — is refused before it is expanded:

* **pixels** (voxels × frames), against ``max_image_pixels``;
* **decoded bytes** (pixels × channels × bytes per sample), against ``max_decoded_bytes``: a
  151 KB RGBA PNG of 6,300 × 6,300 stays under a 40-megapixel cap, yet decodes to 159 MB
  and cost the server 640 MB at its peak.

PNG reads its IHDR chunk directly, JPEG/BMP/TIFF go through Pillow's lazy ``Image.open``
(size and mode, no ``load``), DICOM is parsed without its pixel data (Rows × Columns ×
SamplesPerPixel × BitsAllocated/8 × NumberOfFrames), NIfTI from its 348-byte header (shape ×
dtype), ``.npy`` from its header through numpy's public ``read_magic`` /
``read_array_header_*`` (object arrays are refused there, never unpickled).
"""

from __future__ import annotations

import gzip
import io
import math
import struct
import zlib

from meddx.errors import DataError, PayloadTooLargeError, UnsupportedMediaTypeError
from meddx.modalities.base import DeclaredSize, Upload

__all__ = ["IMAGE_TYPES", "sniff", "declared_size", "inspect_image_upload"]

IMAGE_TYPES = frozenset({
    "image/png", "image/jpeg", "application/dicom", "application/octet-stream",
    "application/gzip", "application/x-gzip", "application/x-nifti", "application/x-npy",
})
# what the bytes must be for a declared type (octet-stream: any of them, by magic number)
_EXPECTED = {
    "image/png": "png", "image/jpeg": "jpeg", "application/dicom": "dicom",
    "application/gzip": "gzip", "application/x-gzip": "gzip", "application/x-nifti": "nifti",
    "application/x-npy": "npy",
}
_EXTENSIONS = (".npy", ".nii", ".nii.gz", ".dcm", ".png", ".jpg", ".jpeg")
UPLOAD_HINT = "send PNG, JPEG, DICOM (application/dicom), NIfTI or .npy"
# PNG colour type → samples per pixel as the reader holds them (a palette becomes RGB(A))
_PNG_CHANNELS = {0: 1, 2: 3, 3: 4, 4: 2, 6: 4}


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


def inspect_image_upload(upload: Upload) -> DeclaredSize:
    """Check that an upload's bytes are what its content type says; its declared size.

    Raises:
        UnsupportedMediaTypeError: not a type an image model reads.
        DataError: the bytes contradict the declared type, or the header is corrupt.
        PayloadTooLargeError: Pillow's own bomb guard fired on the header.
    """
    ctype = (upload.content_type or "application/octet-stream").split(";")[0].strip().lower()
    kind = sniff(upload.data)
    expected = _EXPECTED.get(ctype)
    if expected is not None and kind != expected and not (expected == "nifti" and kind == "gzip"):
        raise DataError(f"the upload is declared {ctype} but its bytes are "
                        f"{kind or 'not a known image format'}",
                        hint="check the file; it may be truncated or mislabelled")
    if kind is None and ctype == "application/octet-stream" \
            and not (upload.name or "").lower().endswith(_EXTENSIONS):
        raise UnsupportedMediaTypeError("the upload is not a known image format",
                                        hint=UPLOAD_HINT)
    return declared_size(upload.data, kind)


def declared_size(data: bytes, kind: str | None) -> DeclaredSize:
    """Pixels and decoded bytes from the header alone; unknown (None) for other formats."""
    try:
        if kind in ("png", "jpeg"):
            return _pil_size(data)
        if kind == "dicom":
            return _dicom_size(data)
        if kind == "npy":
            return _npy_size(data)
        if kind in ("nifti", "gzip"):
            return _nifti_size(data)
    except (PayloadTooLargeError, DataError):
        raise
    except Exception as e:  # noqa: BLE001 — any header failure is a corrupt input
        # the library's own text may quote the file: name its class only
        raise DataError(f"cannot read the {kind} header ({type(e).__name__})",
                        hint="the file is truncated or corrupt") from e
    return DeclaredSize()


def _pil_size(data: bytes) -> DeclaredSize:
    if data.startswith(b"\x89PNG") and len(data) >= 26 and data[12:16] == b"IHDR":
        width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
        channels = _PNG_CHANNELS.get(colour, 4)
        pixels = width * height
        return DeclaredSize(pixels, pixels * channels * max(1, depth // 8))
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:  # lazy: reads the header only
            w, h = im.size
            frames = int(getattr(im, "n_frames", 1) or 1)
            bands = len(im.getbands())
            mode = im.mode
    except Image.DecompressionBombError as e:
        raise PayloadTooLargeError("the image declares more pixels than allowed",
                                   hint="downsample the image before sending it") from e
    sample = 2 if mode.startswith("I;16") else 4 if mode in ("I", "F") else 1
    return DeclaredSize(int(w) * int(h) * frames, int(w) * int(h) * bands * sample)


def _dicom_size(data: bytes) -> DeclaredSize:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=False)
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if rows is None or cols is None:
        return DeclaredSize()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    pixels = int(rows) * int(cols) * frames
    return DeclaredSize(pixels, math.ceil(pixels * samples * bits / 8))


def _npy_size(data: bytes) -> DeclaredSize:
    import numpy as np

    fmt = np.lib.format
    f = io.BytesIO(data)
    try:
        version = fmt.read_magic(f)
        reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = reader(f)
    except (ValueError, EOFError, SyntaxError, TypeError, struct.error) as e:
        raise DataError(f"the .npy header is corrupt or truncated ({type(e).__name__})",
                        hint="save the array again with numpy.save") from e
    if dtype.hasobject:
        raise DataError(".npy file holds Python objects (an object array is a pickle); "
                        "refused without reading it",
                        hint="send a plain numeric array (numpy.save of uint8/uint16/float)")
    count = int(math.prod(int(d) for d in shape))
    return DeclaredSize(count, count * int(dtype.itemsize))


def _nifti_size(data: bytes) -> DeclaredSize:
    import nibabel as nib

    raw = data
    if data.startswith(b"\x1f\x8b"):
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as g:
                raw = g.read(352)  # only the header is inflated
        except (OSError, EOFError, zlib.error) as e:
            raise DataError("the NIfTI .gz file is corrupt",
                            hint="the file is truncated or corrupt") from e
    if len(raw) < 348:
        raise DataError("NIfTI header is truncated", hint="the file is truncated or corrupt")
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:348]), check=False)
    count = int(math.prod(int(d) for d in header.get_data_shape()))
    return DeclaredSize(count, count * int(header.get_data_dtype().itemsize))
