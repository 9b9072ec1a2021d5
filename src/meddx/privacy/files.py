"""De-identifying DICOM files and folders: every file ends written, refused or skipped.

A file is **written** only when it was read completely and its pixel data decodes; the output
goes to a temporary name beside the target and is renamed into place, so an interrupted run
never leaves a partial file. A file is **refused** (with its name and the reason in the
summary) when it claims to be DICOM but cannot be de-identified safely: corrupt or truncated,
pixel data that does not decode, burned-in annotation, a duplicate SOP Instance UID. A file is
**skipped** when it is not DICOM at all (notes, thumbnails) or is a DICOMDIR (an index of
the input that lists patient names: never copied).

Files without the Part 10 header (no preamble and ``DICM``; raw datasets as some archives and
DIMSE dumps store them) are read with ``force=True``: when they hold a SOP Class and SOP
Instance UID they are DICOM instances and are de-identified like the rest — the transfer
syntax is the one pydicom detected (implicit or explicit VR, little endian) and the pixel check
below proves it decodes — and the summary says the header was missing. Anything else is skipped.
"""

from __future__ import annotations

import logging
import os
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meddx.errors import ConfigError, DataError
from meddx.privacy.deid import DeidReport, deidentify, new_uid

__all__ = ["DeidSummary", "FileOutcome", "NotDicomError", "deidentify_file",
           "deidentify_folder", "deidentify_one", "quiet_pydicom", "read_dicom"]

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_UNDEFINED = 0xFFFFFFFF
_DICOMDIR = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage


class NotDicomError(DataError):
    """The file is not DICOM at all (a folder run skips it; a one-file run refuses it)."""


@dataclass
class FileOutcome:
    """What became of one input file."""

    source: str
    status: str  # "written" | "refused" | "skipped"
    reason: str = ""
    target: str = ""
    report: DeidReport | None = None


@dataclass
class DeidSummary:
    """Every input file's outcome, in input order."""

    outcomes: list[FileOutcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        """How many files ended with ``status``."""
        return sum(o.status == status for o in self.outcomes)

    @property
    def reports(self) -> dict[str, DeidReport]:
        """Written files: output path (relative to the output folder) → report."""
        return {o.target: o.report for o in self.outcomes if o.report is not None}

    @property
    def ok(self) -> bool:
        """True when no file was refused."""
        return self.count("refused") == 0


def _sop_uids_present(ds: Any) -> bool:
    from pydicom.uid import UID

    return all(UID(str(ds.get(k, "") or "")).is_valid
               for k in ("SOPClassUID", "SOPInstanceUID"))


def _truncated(ds: Any, size: int) -> str | None:
    """Why the top level of ``ds`` looks cut short, or None.

    pydicom reads a short value or a partial element header at the end of a file silently;
    the raw elements still know their offsets and stated lengths, so compare them with the file.
    """
    from pydicom.dataelem import RawDataElement

    end = 0
    for raw in ds._dict.values():  # raw elements: before conversion, lengths are still known
        if not isinstance(raw, RawDataElement) or raw.length == _UNDEFINED:
            end = size  # an undefined-length element runs to its delimiter: pydicom checks it
            continue
        have = len(raw.value) if raw.value is not None else raw.length
        if have < raw.length:
            return (f"file is truncated: element ({raw.tag.group:04X},{raw.tag.element:04X}) "
                    f"has {have} of its {raw.length} bytes")
        end = max(end, raw.value_tell + raw.length)
    if 0 < end < size:
        return f"file is truncated: {size - end} byte(s) after the last element are no element"
    return None


@contextmanager
def quiet_pydicom() -> Iterator[list[warnings.WarningMessage]]:
    """Catch pydicom's warnings and log records while it handles a file.

    Both can quote raw values of the file (names, ids, dates); they are collected (for the
    truncation check) or dropped, never printed or logged.
    """
    pydicom_logger = logging.getLogger("pydicom")

    def drop(record: logging.LogRecord) -> bool:
        return False

    pydicom_logger.addFilter(drop)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        pydicom_logger.removeFilter(drop)


def _is_part10(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(132)[128:132] == b"DICM"


def read_dicom(path: str | Path) -> Any:
    """Read a whole DICOM file and prove it complete, or say why not.

    Raises:
        NotDicomError: no Part 10 header and not a DICOM dataset either.
        DataError: corrupt, truncated, or no SOP Class/Instance UID (reason in the message).
    """
    path = Path(path)
    part10 = _is_part10(path)
    with quiet_pydicom() as caught:
        ds, problem = _parse(path, part10)
        if not part10 and not _sop_uids_present(ds):
            raise NotDicomError("not DICOM", path=str(path))
        if (getattr(ds, "file_meta", None) or {}).get("MediaStorageSOPClassUID") == _DICOMDIR:
            raise NotDicomError("a DICOMDIR (an index of the input that lists patient "
                                "names): not copied", path=str(path))
        if problem or any("EOF" in str(w.message) for w in caught):
            raise DataError(problem or "file is truncated: it ends inside a data element",
                            path=str(path))
        if not _sop_uids_present(ds):
            raise DataError("corrupt DICOM file: no valid SOP Class and SOP Instance UID",
                            path=str(path))
        if not part10:
            _set_detected_syntax(ds)
        check_pixels(ds, path)
    return ds


def _parse(path: Path, part10: bool) -> tuple[Any, str | None]:
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=not part10)
        problem = _truncated(ds, path.stat().st_size)
        for _ in ds.iterall():  # convert every element and sequence now, not when writing
            pass
    except Exception as e:  # noqa: BLE001 - a parser fed garbage raises anything
        if not part10:
            raise NotDicomError("not DICOM", path=str(path)) from e
        raise DataError(f"corrupt DICOM file: it does not parse ({type(e).__name__})",
                        path=str(path)) from e
    return ds, problem


def _set_detected_syntax(ds: Any) -> None:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    implicit, little = ds.original_encoding
    syntax = (ImplicitVRLittleEndian if implicit else
              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax


def _expected_native_bytes(ds: Any, keyword: str) -> int:
    bits = {"FloatPixelData": 32, "DoubleFloatPixelData": 64}.get(keyword, ds.BitsAllocated)
    count = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
             * int(ds.get("NumberOfFrames", 1) or 1))
    return (count * bits + 7) // 8


def check_pixels(ds: Any, path: str | Path = "") -> None:
    """Refuse pixel data that is short (native syntaxes) or does not decode (all syntaxes).

    Raises:
        DataError: image attributes without pixel data, short or undecodable pixel data.
    """
    from pydicom.pixels import pixel_array

    keyword = next((k for k in _PIXEL_KEYWORDS if k in ds), None)
    if keyword is None:
        if "Rows" in ds or "Image" in ds.SOPClassUID.name:
            raise DataError("image without pixel data: the file is probably truncated",
                            path=str(path))
        return
    syntax = ds.file_meta.get("TransferSyntaxUID") if getattr(ds, "file_meta", None) else None
    try:
        if syntax is None or not syntax.is_compressed:
            need, have = _expected_native_bytes(ds, keyword), len(ds[keyword].value or b"")
            if have < need:
                raise DataError(f"pixel data is short: {have} of {need} bytes (truncated file?)",
                                path=str(path))
        pixel_array(ds)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - decoders raise many kinds on damaged data
        raise DataError(f"pixel data does not decode ({type(e).__name__}: {str(e)[:160]})",
                        path=str(path)) from e


def _write_atomic(out: Any, dst: Path) -> None:
    """Write to a hidden temporary name beside ``dst``, then rename: no partial file is left."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.part")
    try:
        out.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, dst)
    except (ValueError, TypeError, OverflowError, struct.error) as e:  # pydicom won't encode it
        raise DataError(f"cannot be written as DICOM ({type(e).__name__}: {str(e)[:120]})"
                        ) from e
    finally:
        tmp.unlink(missing_ok=True)


def _deidentify_read(path: Path, ds: Any, salt: str, options: dict[str, Any]
                     ) -> tuple[Any, DeidReport]:
    out, report = deidentify(ds, salt=salt, **options)
    if not _is_part10(path):
        report.warnings.append("no DICOM Part 10 header: read as a raw dataset "
                               f"({ds.file_meta.TransferSyntaxUID.name})")
    return out, report


def _reason(e: DataError | OSError) -> str:
    if isinstance(e, OSError):
        return f"cannot be read or written ({e.strerror or type(e).__name__})"
    return e.message + (f" ({e.hint})" if e.hint else "")


def deidentify_file(src: str | Path, dst: str | Path, *, salt: str, **options: Any
                    ) -> DeidReport:
    """De-identify one DICOM file into ``dst`` (never in place).

    Raises:
        ConfigError: ``dst`` is ``src``. DataError: the file is refused (the message says why).
    """
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ConfigError("de-identification never overwrites its input", path=str(src))
    ds = read_dicom(src)
    with quiet_pydicom():
        out, report = _deidentify_read(src, ds, salt, options)
        _write_atomic(out, dst)
    return report


def _one(path: Path, name: str, dst: Path, salt: str, seen: dict[str, str],
         options: dict[str, Any]) -> FileOutcome:
    try:
        ds = read_dicom(path)
        target = "/".join(new_uid(salt, str(ds.get(k)))
                          for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
        target += ".dcm"
        if target in seen:
            raise DataError(f"same SOP Instance UID as {seen[target]}: not written twice")
        with quiet_pydicom():
            out, report = _deidentify_read(path, ds, salt, options)
            _write_atomic(out, dst / target)
    except NotDicomError as e:
        return FileOutcome(name, "skipped", e.message)
    except (DataError, OSError) as e:
        return FileOutcome(name, "refused", _reason(e))
    seen[target] = name
    return FileOutcome(name, "written", target=target, report=report)


def deidentify_one(src: str | Path, dst: str | Path, *, salt: str, **options: Any
                   ) -> DeidSummary:
    """:func:`deidentify_file` for the command line: a refusal becomes the summary's outcome."""
    src, dst = Path(src), Path(dst)
    try:
        report = deidentify_file(src, dst, salt=salt, **options)
    except (DataError, OSError) as e:
        return DeidSummary([FileOutcome(src.name, "refused", _reason(e))])
    return DeidSummary([FileOutcome(src.name, "written", target=dst.name, report=report)])


def deidentify_folder(src: str | Path, dst: str | Path, *, salt: str, **options: Any
                      ) -> DeidSummary:
    """De-identify every DICOM file under ``src`` into ``dst``; one bad file stops nothing.

    Output paths are built from the new UIDs only — ``<study>/<series>/<instance>.dcm`` —
    because input folder and file names often hold names or ids.

    Returns:
        The summary: each file written, refused (with the reason) or skipped (not DICOM).
    """
    src, dst = Path(src), Path(dst)
    if dst.resolve().is_relative_to(src.resolve()):
        raise ConfigError("the output folder must not be inside the input folder", path=str(dst))
    summary = DeidSummary()
    seen: dict[str, str] = {}
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        name = str(path.relative_to(src))
        summary.outcomes.append(_one(path, name, dst, salt, seen, options))
    return summary
