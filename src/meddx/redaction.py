"""Keep what third-party readers say about user data out of the log.

The libraries that decode user files (pydicom, Pillow, nibabel, wfdb, tifffile, OpenSlide,
RDKit …) quote the file in their warnings and log records: a malformed DICOM header made
pydicom write ~570 raw bytes of the file — patient name, ID, birth date — into the server log.
Their messages are not ours to vet, so the service never lets one through:

* :func:`install` (called once by the app factory) puts a log-record factory in front of
  Python's and a hook in front of :func:`warnings.showwarning`. A record from a data
  library's logger, or a warning raised from a data library's code, keeps its level, its
  library and its category; its message (and traceback) is replaced by a fixed sentence.
* :func:`reading_user_data` marks the current thread or task as reading user data: while it
  is active, *every* warning and every record not logged by meddx itself is withheld the same
  way (a numpy ``RuntimeWarning`` on an upload is kept as its category only).

Both work per thread (a :class:`contextvars.ContextVar`, which
:func:`starlette.concurrency.run_in_threadpool` carries into its worker), unlike
:class:`warnings.catch_warnings`, which swaps module-wide state and is unsafe under the
service's threads. RDKit's C++ log does not pass through Python; the molecule reader turns it
off (``RDLogger.DisableLog``) before it parses anything.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "DATA_LIBRARIES",
    "WITHHELD",
    "install",
    "installed",
    "reading_user_data",
    "library_of",
]

#: top-level packages (= logger names) of the libraries that read user data
DATA_LIBRARIES: tuple[str, ...] = (
    "pydicom", "PIL", "nibabel", "wfdb", "tifffile", "openslide", "rdkit", "chemprop",
    "highdicom", "pylibjpeg", "imagecodecs", "pynetdicom", "dicomweb_client", "fhir",
    "fhir_core", "monai", "SimpleITK", "h5py", "zarr",
)
WITHHELD = "message withheld: it may quote the input (patient data never goes to the log)"

_reading: contextvars.ContextVar[int] = contextvars.ContextVar("meddx_reading_user_data",
                                                               default=0)
_lock = threading.Lock()
_state: dict[str, Any] = {"installed": False}


def library_of(name: str) -> str | None:
    """The data library a logger name or module file path belongs to, else None."""
    if "/" in name or "\\" in name:
        parts = Path(name).parts
        if "meddx" in parts:  # our own code: its messages follow the logging rules
            return None
    else:
        parts = (name.split(".")[0],)
    for library in DATA_LIBRARIES:
        if library in parts:
            return library
    return None


@contextlib.contextmanager
def reading_user_data() -> Iterator[None]:
    """Withhold every warning and non-meddx log record raised inside the block (this thread
    or task only). Nests; cheap enough to wrap every read."""
    token = _reading.set(_reading.get() + 1)
    try:
        yield
    finally:
        _reading.reset(token)


def _active() -> bool:
    return _reading.get() > 0


def _redact_record(record: logging.LogRecord, library: str) -> None:
    record.msg = "%s %s: " + WITHHELD
    record.args = (library, record.levelname.lower())
    record.exc_info = None
    record.exc_text = None
    record.stack_info = None


def _record_factory(previous: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        library = library_of(record.name)
        if record.name == "py.warnings" and record.args:  # logging.captureWarnings(True)
            library = library_of(str(record.args[0]).split(":")[0]) or (
                "warnings" if _active() else None)
        if library is None and _active() and record.name.split(".")[0] != "meddx":
            library = record.name.split(".")[0] or "root"
        if library is not None:
            _redact_record(record, library)
        return record

    return factory


def _showwarning(previous: Callable[..., None]) -> Callable[..., None]:
    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        library = library_of(str(filename))
        if library is None and _active():
            library = Path(str(filename)).stem or "unknown"
        if library is not None:
            message = category(f"{library} {category.__name__}: {WITHHELD}")
            line = ""  # not the source line either: the text is all that is shown
        previous(message, category, filename, lineno, file, line)

    return show


def install() -> None:
    """Put the record factory and the warnings hook in place (idempotent, process-wide)."""
    with _lock:
        if _state["installed"]:
            return
        logging.setLogRecordFactory(_record_factory(logging.getLogRecordFactory()))
        warnings.showwarning = _showwarning(warnings.showwarning)
        _state["installed"] = True


def installed() -> bool:
    """Whether :func:`install` has run in this process."""
    return bool(_state["installed"])
