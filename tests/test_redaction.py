"""``meddx.redaction``: third-party messages about user data never reach the log, per thread."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

from meddx import redaction

SRC = Path(__file__).resolve().parents[1] / "src"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.name, self.format(record)))


def _collecting(*names: str) -> _Collect:
    handler = _Collect()
    for name in names:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    return handler


def test_data_library_records_are_withheld_everywhere() -> None:
    redaction.install()
    redaction.install()  # idempotent: one factory, not two
    h = _collecting("pydicom", "PIL.PngImagePlugin", "nibabel.global")
    try:
        logging.getLogger("pydicom").warning("Invalid value for VR UI: %r", "ZZSECRET^JANE")
        logging.getLogger("PIL.PngImagePlugin").debug("STREAM %s", b"ZZSECRET")
        try:
            raise ValueError("ZZSECRET in a traceback")
        except ValueError:
            logging.getLogger("nibabel.global").exception("failed")
    finally:
        for name in ("pydicom", "PIL.PngImagePlugin", "nibabel.global"):
            logging.getLogger(name).removeHandler(h)
    text = "\n".join(line for _, line in h.lines)
    assert "ZZSECRET" not in text
    assert [line.split(":")[0] for _, line in h.lines] == [
        "pydicom warning", "PIL debug", "nibabel error"]
    assert all(redaction.WITHHELD in line for _, line in h.lines)


def test_reading_user_data_withholds_other_libraries_only_in_its_own_thread() -> None:
    redaction.install()
    h = _collecting("numpy.reader", "meddx.serving.engine", "uvicorn.error")
    seen = threading.Event()
    done = threading.Event()

    def other_thread() -> None:
        seen.wait(5)
        logging.getLogger("uvicorn.error").warning("other thread ZZPUBLIC")
        done.set()

    t = threading.Thread(target=other_thread)
    t.start()
    try:
        with redaction.reading_user_data():
            logging.getLogger("numpy.reader").warning("overflow in ZZSECRET")
            logging.getLogger("meddx.serving.engine").info("meddx's own line stays")
            seen.set()
            done.wait(5)
        logging.getLogger("uvicorn.error").warning("after the read ZZPUBLIC")
    finally:
        t.join(5)
        for name in ("numpy.reader", "meddx.serving.engine", "uvicorn.error"):
            logging.getLogger(name).removeHandler(h)
    lines = dict(h.lines[:2])
    assert "ZZSECRET" not in lines["numpy.reader"] and "numpy warning" in lines["numpy.reader"]
    assert lines["meddx.serving.engine"] == "meddx's own line stays"
    assert sum("ZZPUBLIC" in line for _, line in h.lines) == 2  # outside the read: kept


_WARNINGS = r"""
import sys, threading, warnings
from meddx import redaction
redaction.install()
warnings.simplefilter("always")
# a warning raised from a data library's own file: withheld wherever it is raised
warnings.warn_explicit("Invalid value for VR PN: 'ZZSECRET^JANE'", UserWarning,
                       "/x/site-packages/pydicom/valuerep.py", 440)
def reader():
    with redaction.reading_user_data():
        warnings.warn("overflow near ZZSECRET", RuntimeWarning)
t = threading.Thread(target=reader); t.start(); t.join()
warnings.warn("a plain warning ZZPUBLIC outside any read", UserWarning)
"""


def test_warnings_are_withheld_from_data_libraries_and_during_reads() -> None:
    """The :func:`warnings.showwarning` hook, in a fresh process (pytest swaps that hook
    around each test)."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", _WARNINGS], env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    assert "ZZSECRET" not in out.stderr, out.stderr
    assert "pydicom UserWarning: message withheld" in out.stderr
    assert "RuntimeWarning: message withheld" in out.stderr
    assert "ZZPUBLIC" in out.stderr
