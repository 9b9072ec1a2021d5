"""Read one medical image file into a channel-first array, safely.

:func:`read_image` takes a path or the bytes of an upload (with its file name) and returns an
:class:`ImageData`: float32 ``(C, H, W)`` or ``(C, D, H, W)`` plus acquisition facts in ``meta``
(format, DICOM Modality, photometric interpretation, original shape, spacing, value range …;
never patient identifiers). Formats, detected from the content first and the name second:

* PNG, JPEG, BMP, TIFF — Pillow (modes 1/L/LA/P/RGB/RGBA/I;16/I/F handled explicitly)
* DICOM — pydicom + pylibjpeg (see :mod:`meddx.modalities.image.dicom`)
* NIfTI ``.nii`` / ``.nii.gz`` — nibabel, reoriented to RAS (``as_closest_canonical``)
* NumPy ``.npy`` — ``numpy.load(allow_pickle=False)``; pickles are never loaded

The declared image size is checked against ``max_pixels`` from the header, before any pixel is
decoded (decompression bombs); :func:`to_model_grid` (in :mod:`meddx.modalities.image.grid`)
then maps an :class:`ImageData` onto a network's input grid.
"""

from __future__ import annotations

import io
import logging
import struct
import tokenize
import warnings
import zlib
from os import PathLike
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from meddx.errors import DataError, PayloadTooLargeError
from meddx.modalities.image.data import ImageData
from meddx.modalities.image.dicom import read_dicom
from meddx.modalities.image.grid import (
    NORMALIZATIONS,
    WINDOW_PRESETS,
    check_input,
    to_model_grid,
)

__all__ = [
    "ImageData",
    "read_image",
    "detect_format",
    "image_from_array",
    "to_model_grid",
    "check_input",
    "SUPPORTED_FORMATS",
    "NORMALIZATIONS",
    "WINDOW_PRESETS",
    "DEFAULT_MAX_PIXELS",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 50_000_000
SUPPORTED_FORMATS = ("png", "jpeg", "bmp", "tiff", "dicom", "nifti", "npy")
_SUPPORTED_TEXT = "PNG, JPEG, BMP, TIFF, DICOM (.dcm), NIfTI (.nii, .nii.gz), NumPy (.npy)"
_PILLOW = {"png": "PNG", "jpeg": "JPEG", "bmp": "BMP", "tiff": "TIFF"}
_EXTENSIONS = {
    ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".jpe": "jpeg", ".bmp": "bmp",
    ".tif": "tiff", ".tiff": "tiff", ".dcm": "dicom", ".dicom": "dicom", ".dic": "dicom",
    ".ima": "dicom", ".nii": "nifti", ".nii.gz": "nifti", ".npy": "npy",
}
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),
    (b"MM\x00+", "tiff"),
    (b"\x93NUMPY", "npy"),
    (b"BM", "bmp"),
)
_HEAD = 4096


# ------------------------------------------------------------------------------ detection
def _extension_format(name: str | None) -> str | None:
    if not name:
        return None
    lower = name.lower()
    if lower.endswith(".nii.gz"):
        return "nifti"
    return _EXTENSIONS.get(Path(lower).suffix)


def _is_nifti_header(head: bytes) -> bool:
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return True
    return len(head) >= 8 and head[4:8] == b"n+2\x00"


def _gunzip_head(head: bytes) -> bytes:
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 600)
    except zlib.error:
        return b""


def detect_format(head: bytes, name: str | None = None) -> str:
    """The format of a file from its first bytes (magic numbers), else from its name.

    Content wins over the name: a DICOM file called ``scan.png`` is read as DICOM.

    Raises:
        DataError: neither the content nor the name identifies a supported format.
    """
    by_name = _extension_format(name)
    found = None
    if len(head) >= 132 and head[128:132] == b"DICM":
        found = "dicom"
    elif _is_nifti_header(head):
        found = "nifti"
    elif head[:2] == b"\x1f\x8b":
        if not _is_nifti_header(_gunzip_head(head)):
            raise DataError("file is gzip-compressed but is not a NIfTI volume", path=name,
                            hint=f"supported formats: {_SUPPORTED_TEXT}")
        found = "nifti"
    else:
        found = next((fmt for magic, fmt in _MAGIC if head.startswith(magic)), None)
    if found is not None:
        if by_name is not None and by_name != found:
            logger.debug("file named as %s holds %s; reading it as %s", by_name, found, found)
        return found
    if by_name is not None:
        return by_name  # e.g. DICOM without preamble; the reader gives a precise error
    raise DataError(
        "unknown image format",
        path=name,
        hint=f"supported formats: {_SUPPORTED_TEXT}",
    )


# --------------------------------------------------------------------------------- entry
def _open_source(source: Any, name: str | None) -> tuple[str | bytes, str, bytes]:
    """(path-or-bytes, display name, first bytes) of a path, bytes or binary file."""
    if isinstance(source, str | PathLike):
        path = Path(source)
        label = name or str(source)
        if not path.exists():
            raise DataError("image file not found", path=label,
                            hint="check the path (relative paths are resolved from the "
                            "current folder or the dataset root)")
        if path.is_dir():
            raise DataError("expected an image file, got a folder", path=label,
                            hint="pass the files of a DICOM series one by one, or a "
                            "multi-frame DICOM / NIfTI volume")
        try:
            with path.open("rb") as f:
                head = f.read(_HEAD)
        except OSError as e:
            raise DataError(f"image file cannot be read ({e.strerror or e})", path=label,
                            hint="check the file's permissions") from e
        return str(path), label, head
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        return data, name or "upload", data[:_HEAD]
    if hasattr(source, "read"):
        data = source.read()
        if not isinstance(data, bytes):
            raise DataError("file object must be opened in binary mode", path=name)
        return data, name or getattr(source, "name", None) or "upload", data[:_HEAD]
    raise DataError(f"cannot read an image from a {type(source).__name__}",
                    hint="pass a path, bytes or a binary file object")


def read_image(source: str | PathLike[str] | bytes | BinaryIO, *, name: str | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageData:
    """Read a PNG, JPEG, BMP, TIFF, DICOM, NIfTI or ``.npy`` file into an :class:`ImageData`.

    Args:
        source: a path, the bytes of a file, or a binary file object.
        name: the file name (uploads); used to guess the format when the content does not
            say, and in error messages. Defaults to the path.
        max_pixels: largest number of pixels (voxels, frames included) accepted, checked from
            the header before decoding.

    Raises:
        DataError: missing, unreadable, corrupt, truncated or unsupported file.
        PayloadTooLargeError: declared dimensions over ``max_pixels``.
    """
    src, label, head = _open_source(source, name)
    fmt = detect_format(head, name or label)
    if not head:
        raise DataError("image file is empty", path=label)
    if fmt in _PILLOW:
        return _read_pillow(src, label, head, fmt, max_pixels)
    if fmt == "dicom":
        force = not (len(head) >= 132 and head[128:132] == b"DICM")
        fp = src if isinstance(src, str) else io.BytesIO(src)
        return read_dicom(fp, name=label, max_pixels=max_pixels, force=force)
    if fmt == "nifti":
        return _read_nifti(src, label, head, max_pixels)
    return _read_npy(src, label, max_pixels)


def _too_large(what: str, count: int, max_pixels: int, label: str) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"{what} declares {count:,} pixels, over the cap of {max_pixels:,}",
        path=label,
        hint="downsample the image before sending it, or raise the image pixel cap",
    )


# --------------------------------------------------------------------------------- Pillow
def _read_pillow(src: str | bytes, label: str, head: bytes, fmt: str, max_pixels: int
                 ) -> ImageData:
    from PIL import Image, ImageOps, UnidentifiedImageError

    if fmt == "png" and len(head) >= 24 and head[12:16] == b"IHDR":
        width, height = struct.unpack(">II", head[16:24])  # before Pillow parses anything
        if width * height > max_pixels:
            raise _too_large("PNG header", width * height, max_pixels, label)
    fp = src if isinstance(src, str) else io.BytesIO(src)
    notes: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap applies
        warnings.simplefilter("ignore", UserWarning)  # e.g. "Corrupt EXIF data": not fatal
        try:
            with Image.open(fp, formats=list(_PILLOW.values())) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise _too_large(f"{fmt.upper()} header", width * height, max_pixels, label)
                n_frames = int(getattr(im, "n_frames", 1) or 1)
                im.load()
                if _has_orientation(im):
                    notes.append("rotated upright from its EXIF orientation")
                oriented = ImageOps.exif_transpose(im)
                arr, value_range, mode = _pillow_array(oriented, label, notes)
        except Image.DecompressionBombError as e:
            raise PayloadTooLargeError(
                f"{fmt.upper()} header declares too many pixels ({e})", path=label,
                hint="downsample the image before sending it") from e
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error,
                EOFError, IndexError, TypeError, KeyError, ZeroDivisionError,
                RuntimeError) as e:  # what Pillow's plugins raise on damaged files (fuzzed)
            raise DataError(
                f"{fmt.upper()} file is corrupt or truncated ({e})",
                path=label,
                hint="open it in an image viewer to check it, or export it again",
            ) from e
    if n_frames > 1:
        notes.append(f"{n_frames} frames/pages: only the first is used")
    channel_first = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
    meta = {"format": fmt, "modality": None, "photometric": mode,
            "original_shape": [int(s) for s in arr.shape], "spacing": None,
            "value_range": value_range, "n_frames": n_frames, "notes": notes}
    return ImageData(np.ascontiguousarray(channel_first, dtype=np.float32), 2, meta)


def _has_orientation(im: Any) -> bool:
    try:
        return int(im.getexif().get(0x0112, 1)) != 1
    except (AttributeError, TypeError, ValueError):
        return False


def _pillow_array(im: Any, label: str, notes: list[str]
                  ) -> tuple[np.ndarray, list[float] | None, str]:
    """Pixels of a Pillow image, per mode; alpha is dropped (and noted), never composited."""
    mode = im.mode
    if mode == "1":
        return np.asarray(im.convert("L")), [0.0, 255.0], mode
    if mode == "L":
        return np.asarray(im), [0.0, 255.0], mode
    if mode in ("LA", "La"):
        notes.append("alpha channel dropped")
        return np.asarray(im)[..., 0], [0.0, 255.0], mode
    if mode in ("P", "PA"):
        notes.append("palette expanded to RGB")
        return np.asarray(im.convert("RGBA"))[..., :3], [0.0, 255.0], mode
    if mode == "RGB":
        return np.asarray(im), [0.0, 255.0], mode
    if mode in ("RGBA", "RGBa", "RGBX"):
        if mode != "RGBX":
            notes.append("alpha channel dropped")
        return np.asarray(im)[..., :3], [0.0, 255.0], mode
    if mode in ("CMYK", "YCbCr"):
        notes.append(f"{mode} converted to RGB")
        return np.asarray(im.convert("RGB")), [0.0, 255.0], mode
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16), [0.0, 65535.0], mode
    if mode in ("I", "F"):
        arr = np.asarray(im)
        if mode == "F" and not np.isfinite(arr).all():
            raise DataError("image contains NaN or infinite values", path=label)
        return arr, None, mode
    raise DataError(f"image mode '{mode}' is not supported", path=label,
                    hint="save it as 8/16-bit grayscale or RGB")


# ---------------------------------------------------------------------------------- NIfTI
def _gunzip_capped(data: bytes, limit: int, label: str, max_pixels: int) -> bytes:
    out = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        raw = out.decompress(data, limit + 1)
    except zlib.error as e:
        raise DataError(f"NIfTI .gz file is corrupt ({e})", path=label) from e
    if len(raw) > limit:
        raise PayloadTooLargeError(f"NIfTI volume decompresses beyond {limit:,} bytes",
                                   path=label, hint=f"the cap is {max_pixels:,} voxels")
    return raw


def _nifti_image(src: str | bytes, label: str, head: bytes, max_pixels: int) -> Any:
    import nibabel as nib

    if isinstance(src, str) and _extension_format(src) == "nifti":
        return nib.load(src)  # lazy: only the header is read here
    data = src if isinstance(src, bytes) else Path(src).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = _gunzip_capped(data, max_pixels * 8 + (1 << 20), label, max_pixels)
    if data[344:348] == b"ni1\x00":
        raise DataError("NIfTI header/image pair (.hdr/.img) is not supported", path=label,
                        hint="convert it to a single .nii or .nii.gz file")
    kind = nib.Nifti2Image if data[4:8] == b"n+2\x00" else nib.Nifti1Image
    return kind.from_bytes(data)


def _read_nifti(src: str | bytes, label: str, head: bytes, max_pixels: int) -> ImageData:
    import nibabel as nib

    try:
        img = _nifti_image(src, label, head, max_pixels)
        shape = tuple(int(s) for s in img.shape)
        if int(np.prod(shape)) > max_pixels:
            raise _too_large("NIfTI header", int(np.prod(shape)), max_pixels, label)
        if len(shape) < 2:
            raise DataError(f"NIfTI image has shape {shape}; expected 2D, 3D or 4D", path=label)
        disk = img.get_data_dtype()
        slope, inter = img.header.get_slope_inter()
        img = nib.as_closest_canonical(img) if len(shape) >= 3 else img
        data = np.asarray(img.get_fdata(dtype=np.float32))
        zooms = [float(z) for z in img.header.get_zooms()[:3]]
    except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError,
            nib.wrapstruct.WrapStructError, nib.orientations.OrientationError, OSError,
            EOFError, ValueError, TypeError,
            IndexError, KeyError, OverflowError, zlib.error, struct.error) as e:
        raise DataError(f"NIfTI file is corrupt or truncated ({e})", path=label,
                        hint="check it with `nib-ls` or export it again") from e
    if not np.isfinite(data).all():
        raise DataError("NIfTI volume contains NaN or infinite values", path=label,
                        hint="replace them (e.g. numpy.nan_to_num) before sending")
    notes = ["reoriented to RAS (closest canonical)"] if len(shape) >= 3 else []
    if data.ndim > 3:
        data = np.moveaxis(data.reshape(*data.shape[:3], -1), -1, 0)
        notes.append(f"{data.shape[0]} volumes along the 4th axis used as channels")
    else:
        data = data[None]
    spatial = 3
    if data.shape[-1] == 1:
        data, spatial = data[..., 0], 2
    unscaled = slope in (None, 1.0) and inter in (None, 0.0)
    integer = disk.kind in "ub" and disk.itemsize <= 2 and unscaled
    value_range = [0.0, float(np.iinfo(disk).max if disk.kind == "u" else 1)] if integer else None
    meta = {"format": "nifti", "modality": None, "photometric": None,
            "original_shape": list(shape), "spacing": zooms[:spatial], "orientation": "RAS",
            "value_range": value_range, "n_frames": 1, "notes": notes}
    return ImageData(np.ascontiguousarray(data, dtype=np.float32), spatial, meta)


# ---------------------------------------------------------------------------------- .npy
def _read_npy(src: str | bytes, label: str, max_pixels: int) -> ImageData:
    fp = open(src, "rb") if isinstance(src, str) else io.BytesIO(src)  # noqa: SIM115
    try:
        with fp:
            version = np.lib.format.read_magic(fp)
            reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            shape, _, dtype = reader(fp)
            if int(np.prod(shape)) > max_pixels:
                raise _too_large(".npy header", int(np.prod(shape)), max_pixels, label)
            if dtype.hasobject:
                raise DataError(".npy file holds Python objects (a pickle); refused", path=label,
                                hint="save a plain numeric array (numpy.save of uint8/float)")
            fp.seek(0)
            arr = np.load(fp, allow_pickle=False)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError, KeyError,
            tokenize.TokenError) as e:  # the header is a Python literal: damaged, it fails here
        raise DataError(f".npy file is corrupt or truncated ({e})", path=label) from e
    return image_from_array(arr, name=label, source_format="npy")


def _array_layout(arr: np.ndarray, spatial_dims: int | None, label: str) -> tuple[np.ndarray, int]:
    shape = arr.shape
    if arr.ndim == 2:
        return arr[None], 2
    if arr.ndim == 3:
        last, first = shape[-1] in (1, 3, 4), shape[0] in (1, 3, 4)
        if spatial_dims == 3:
            return arr[None], 3
        if last and not first:
            return np.moveaxis(arr, -1, 0), 2
        if first:
            return arr, 2
        return arr[None], 3
    if arr.ndim == 4:
        if shape[0] <= 4:
            return arr, 3
        if shape[-1] <= 4:
            return np.moveaxis(arr, -1, 0), 3
    raise DataError(
        f"array of shape {shape} is not an image layout",
        path=label,
        hint="use (H, W), (H, W, C), (C, H, W), (D, H, W) or (C, D, H, W)",
    )


def image_from_array(array: np.ndarray, *, spatial_dims: int | None = None,
                     name: str | None = None, source_format: str = "array") -> ImageData:
    """Wrap a NumPy array as an :class:`ImageData`, guessing the layout.

    ``(H, W)`` → 2D gray; ``(H, W, C)`` / ``(C, H, W)`` with C in {1, 3, 4} → 2D;
    other 3-axis arrays → a 3D volume ``(D, H, W)``; ``(C, D, H, W)`` / ``(D, H, W, C)`` → 3D.
    ``spatial_dims=3`` forces a 3-axis array to be read as a volume.

    Raises:
        DataError: non-numeric data, NaN/inf values, or no image layout.
    """
    arr = np.asarray(array)
    label = name or "array"
    is_bool = arr.dtype == bool
    if is_bool:
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "uif":
        raise DataError(f"array of dtype {arr.dtype} is not an image", path=label,
                        hint="use an integer or float array")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise DataError("array contains NaN or infinite values", path=label)
    if arr.size and np.abs(arr).max() > np.finfo(np.float32).max:
        raise DataError("array values exceed the float32 range", path=label,
                        hint="rescale the data before sending it")
    value_range = None
    if arr.dtype in (np.uint8, np.uint16):
        value_range = [0.0, float(np.iinfo(arr.dtype).max)]
    if is_bool:
        value_range = [0.0, 1.0]
    out, spatial = _array_layout(arr, spatial_dims, label)
    meta = {"format": source_format, "modality": None, "photometric": None,
            "original_shape": [int(s) for s in arr.shape], "spacing": None,
            "value_range": value_range, "n_frames": 1, "dtype": str(arr.dtype), "notes": []}
    return ImageData(np.ascontiguousarray(out, dtype=np.float32), spatial, meta)
