"""DICOM pixel data → :class:`~meddx.modalities.image.io.ImageData`, as a thin layer over pydicom.

pydicom decodes (with the pylibjpeg plugins for JPEG baseline/extended/lossless, JPEG-LS,
JPEG 2000 and RLE) and converts YBR to RGB (``as_rgb``); this module adds what a model input
needs: the modality LUT (rescale slope/intercept → e.g. Hounsfield units), MONOCHROME1
inversion, PALETTE COLOR expansion, multi-frame grayscale as a 3D volume, a dimension cap checked
before anything is decoded, and errors that say what to do. ``meta`` never holds patient
identifiers, dates or UIDs.
"""

from __future__ import annotations

import logging
import struct
import warnings
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from meddx.errors import DataError, MeddxError, PayloadTooLargeError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from meddx.modalities.image.data import ImageData

__all__ = ["read_dicom"]

logger = logging.getLogger(__name__)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def read_dicom(fp: BinaryIO | str, *, name: str, max_pixels: int, force: bool = False
               ) -> ImageData:
    """Read one DICOM file (path or open binary file) into channel-first float32.

    Grayscale single frame → (1, H, W); grayscale multi-frame → (1, F, H, W) (frames as depth);
    RGB/YBR/PALETTE single frame → (3, H, W); RGB multi-frame → first frame only (noted).

    Args:
        fp: path or binary file object.
        name: shown in errors (the file name).
        max_pixels: cap on Rows × Columns × decoded frames, checked before decoding.
        force: read files without the ``DICM`` preamble (old ACR-NEMA style).

    Raises:
        DataError: not DICOM, no pixel data, truncated, or a transfer syntax that cannot be
            decoded here. PayloadTooLargeError: declared dimensions over ``max_pixels``.
    """
    from pydicom.errors import BytesLengthException

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom warns per non-conformant value
        try:
            return _read(fp, name, max_pixels, force)
        except MeddxError:
            raise
        except (BytesLengthException, NotImplementedError, ValueError, TypeError, KeyError,
                AttributeError, IndexError, OverflowError, struct.error, EOFError, OSError) as e:
            # pydicom parses elements lazily: a damaged one fails wherever it is first read
            raise DataError(
                f"DICOM file is corrupt ({type(e).__name__}: {e})",
                path=name,
                hint="copy or export the file again from the PACS / modality",
            ) from e


def _read(fp: BinaryIO | str, name: str, max_pixels: int, force: bool) -> ImageData:
    ds = _dcmread(fp, name, force)
    rows, cols, frames, spp = _geometry(ds, name)
    color = spp > 1 or str(ds.get("PhotometricInterpretation", "")).startswith("PALETTE")
    decoded_frames = 1 if color else frames
    if rows * cols * decoded_frames > max_pixels:
        raise PayloadTooLargeError(
            f"DICOM image declares {rows}×{cols}×{decoded_frames} pixels, over the cap of "
            f"{max_pixels:,}",
            path=name,
            hint="downsample it before sending, or raise the image pixel cap",
        )
    notes: list[str] = []
    index = 0 if frames > 1 and color else None
    if index is not None:
        notes.append(f"colour multi-frame ({frames} frames): only the first frame is used")
    arr = _decode(ds, name, index)
    arr, value_range, photometric = _to_values(arr, ds, notes)
    if arr.ndim == 2:
        out, spatial = arr[None], 2
    elif color:
        out, spatial = np.moveaxis(arr, -1, 0), 2
    else:
        out, spatial = (arr[None], 3) if frames > 1 else (arr[None, 0], 2)
    from meddx.modalities.image.data import ImageData

    meta = _meta(ds, photometric, arr.shape, frames, spatial, value_range, notes)
    return ImageData(array=np.ascontiguousarray(out, dtype=np.float32), spatial_dims=spatial,
                     meta=meta)


def _dcmread(fp: BinaryIO | str, name: str, force: bool) -> Dataset:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(fp, force=force)
    except InvalidDicomError as e:
        raise DataError(
            "file is not DICOM (no 'DICM' marker after the 128-byte preamble)",
            path=name,
            hint="send a DICOM Part 10 file (.dcm); supported formats: PNG, JPEG, BMP, TIFF, "
            "DICOM, NIfTI (.nii/.nii.gz), NumPy .npy",
        ) from e
    except (EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(
            f"DICOM file is truncated or corrupt ({type(e).__name__}: {e})",
            path=name,
            hint="copy or export the file again from the PACS / modality",
        ) from e


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    value = ds.get(keyword, default)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _geometry(ds: Dataset, name: str) -> tuple[int, int, int, int]:
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        kind = str(ds.get("Modality", "") or ds.get("SOPClassUID", "") or "unknown")
        raise DataError(
            f"DICOM file has no pixel data (it is a '{kind}' object, e.g. a report, RT plan or "
            "DICOMDIR)",
            path=name,
            hint="send an image instance (CT, MR, CR/DX, US, SC …)",
        )
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if not rows or not cols:
        raise DataError("DICOM image has no Rows/Columns", path=name,
                        hint="the file header is damaged; export it again")
    frames = _int(ds, "NumberOfFrames", 1) or 1
    spp = _int(ds, "SamplesPerPixel", 1) or 1
    return rows, cols, frames, spp


def _decode(ds: Dataset, name: str, index: int | None) -> np.ndarray:
    from pydicom.pixels import pixel_array

    syntax = _syntax_name(ds)
    try:
        return pixel_array(ds, index=index, as_rgb=True)
    except (NotImplementedError, RuntimeError, ImportError) as e:
        raise DataError(
            f"cannot decode DICOM pixel data with transfer syntax '{syntax}' ({e})",
            path=name,
            hint="meddx decodes uncompressed, deflated, RLE, JPEG baseline/extended/lossless, "
            "JPEG-LS and JPEG 2000 with the pylibjpeg plugins; decompress the file with "
            "`gdcmconv --raw` or `dcmdjpeg` and send it again",
        ) from e
    except BaseException as e:  # noqa: BLE001 - see below
        # pylibjpeg-rle is Rust: on malformed data it panics with pyo3's PanicException, a
        # BaseException that would pass every `except Exception` up to the server loop.
        corrupt = (ValueError, EOFError, OSError, KeyError, AttributeError, TypeError,
                   IndexError)
        if not isinstance(e, corrupt) and type(e).__name__ != "PanicException":
            raise
        raise DataError(
            f"DICOM pixel data is truncated or does not match its header ({e})",
            path=name,
            hint="the file was probably cut short in transfer or has a damaged header; "
            "copy or export it again",
        ) from e


def _syntax_name(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return getattr(uid, "name", None) or str(uid or "implicit VR little endian (assumed)")


def _stored_range(ds: Dataset) -> tuple[float, float] | None:
    """Range of the stored integer values (BitsStored, PixelRepresentation), if ≤ 16 bits."""
    if "PixelData" not in ds:
        return None
    bits = _int(ds, "BitsStored") or _int(ds, "BitsAllocated")
    if not bits or bits > 16:
        return None
    if _int(ds, "PixelRepresentation", 0) == 1:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


def _to_values(arr: np.ndarray, ds: Dataset, notes: list[str]
               ) -> tuple[np.ndarray, tuple[float, float] | None, str]:
    """Modality LUT, MONOCHROME1 inversion and PALETTE COLOR expansion."""
    from pydicom.pixels import apply_color_lut, apply_rescale

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    value_range = _stored_range(ds)
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        bits = 8 if arr.dtype == np.uint8 else 16
        notes.append("PALETTE COLOR expanded to RGB")
        return arr, (0.0, float(2**bits - 1)), photometric
    if arr.ndim == 3 and arr.shape[-1] == 3 and (_int(ds, "SamplesPerPixel", 1) or 1) == 3:
        if photometric.startswith("YBR"):
            notes.append(f"{photometric} converted to RGB")
        return arr, value_range, photometric
    rescaled = apply_rescale(arr, ds)
    if rescaled is not arr and value_range is not None:
        ends = apply_rescale(np.asarray(value_range), ds)
        value_range = (float(np.min(ends)), float(np.max(ends)))
    arr = rescaled
    if photometric == "MONOCHROME1":
        arr = _invert(arr, value_range)
        notes.append("MONOCHROME1 inverted so that higher values are brighter")
    return arr, value_range, photometric


def _invert(arr: np.ndarray, value_range: tuple[float, float] | None) -> np.ndarray:
    arr = arr.astype(np.float64)
    lo, hi = value_range if value_range is not None else (float(arr.min()), float(arr.max()))
    return (lo + hi) - arr


def _spacing(ds: Dataset, spatial: int) -> list[float | None] | None:
    pixel = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    try:
        row_col = [float(pixel[0]), float(pixel[1])] if pixel else None
    except (TypeError, ValueError, IndexError):
        row_col = None
    if spatial == 2:
        return row_col
    depth = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
    try:
        depth = float(depth) if depth not in (None, "") else None
    except (TypeError, ValueError):
        depth = None
    return [depth, *(row_col or [None, None])]


def _first_number(value: Any) -> float:
    if isinstance(value, str | bytes):
        return float(value)
    try:
        return float(value[0])  # multi-valued: the first window is the default one
    except TypeError:
        return float(value)


def _window(ds: Dataset) -> list[float] | None:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center in (None, "") or width in (None, ""):
        return None
    try:
        return [_first_number(center), _first_number(width)]
    except (TypeError, ValueError, IndexError):
        return None


def _meta(ds: Dataset, photometric: str, shape: tuple[int, ...], frames: int, spatial: int,
          value_range: tuple[float, float] | None, notes: list[str]) -> dict[str, Any]:
    """Acquisition facts the model checks need; never names, ids, dates or UIDs."""
    meta: dict[str, Any] = {
        "format": "dicom",
        "modality": str(ds.get("Modality", "") or "") or None,
        "photometric": photometric,
        "transfer_syntax": _syntax_name(ds),
        "bits_stored": _int(ds, "BitsStored"),
        "original_shape": [int(s) for s in shape],
        "n_frames": frames,
        "spacing": _spacing(ds, spatial),
        "value_range": list(value_range) if value_range is not None else None,
        "window": _window(ds),
        "body_part": str(ds.get("BodyPartExamined", "") or "") or None,
        "rescaled": "RescaleSlope" in ds or "RescaleIntercept" in ds
        or "ModalityLUTSequence" in ds,
        "notes": notes,
    }
    return meta
