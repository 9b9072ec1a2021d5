"""`meddx dicom` mistakes are answered with a message and a hint (exit 2), never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pynetdicom")

MEDDX = [sys.executable, "-m", "meddx.cli"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MEDDX, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize(("args", "words"), [
    (["dicom", "status", "--work", "{tmp}/nothing"], "no meddx DICOM work folder"),
    (["dicom", "queue", "--work", "{tmp}/nothing"], "no meddx DICOM work folder"),
    (["dicom", "listen", "{tmp}/nope", "--allow", "PACS", "--work", "{tmp}/w"],
     "no destination for the results"),
    (["dicom", "listen", "{tmp}/nope", "--allow", "PACS", "--dest", "ORTHANC@pacs",
      "--work", "{tmp}/w"], "neither AE@host:port nor a URL"),
    (["dicom", "watch", "ftp://pacs", "--model", "{tmp}/nope", "--dest", "A@h:1", "--work",
      "{tmp}/w"], "not a DICOMweb URL"),
])
def test_mistakes_get_a_message_and_exit_2(tmp_path: Path, args: list[str], words: str) -> None:
    proc = _run(*(a.format(tmp=tmp_path) for a in args))
    assert proc.returncode == 2, proc.stderr
    assert words in proc.stderr and "Traceback" not in proc.stderr
