"""A real PACS for the DICOM tests: Debian's Orthanc started as a plain process on loopback.

``orthanc`` (session fixture, registered in ``conftest.py``) yields a :class:`OrthancServer`:
temporary storage, free HTTP and DICOM ports on 127.0.0.1, AE title ``ORTHANC``, the DICOMweb
plugin at ``/dicom-web/``, remote access and authentication off, and a ``DicomModalities``
entry ``meddx`` (AE ``MEDDX``, 127.0.0.1, :attr:`OrthancServer.meddx_port`) so a test can
bind a meddx listener to that port and ask Orthanc to send it a study with
``orthanc.rest("/modalities/meddx/store", json=[study_id])``.

Without Orthanc installed the fixture skips, except under ``CI=true`` where it fails (the
project's rule: ``make test`` installs it through the Makefile's ``orthanc`` target).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
AE_TITLE = "ORTHANC"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if Path(p).exists()), None)


def dicomweb_plugin() -> Path | None:
    for d in PLUGIN_DIRS:
        for p in sorted(d.glob("libOrthancDicomWeb.so*")) if d.is_dir() else ():
            return p
    return None


@dataclass
class OrthancServer:
    """A running Orthanc: where it answers, and a REST helper."""

    http_port: int
    dicom_port: int
    meddx_port: int
    folder: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    ae_title: str = AE_TITLE
    host: str = "127.0.0.1"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.http_url}/dicom-web"

    def rest(self, path: str, method: str | None = None, **kwargs: Any) -> Any:
        """Call Orthanc's REST API (GET, or POST when ``json``/``content`` is given); the
        decoded JSON answer, or the bytes when it is not JSON. Raises on a 4xx/5xx."""
        method = method or ("POST" if "json" in kwargs or "content" in kwargs else "GET")
        r = httpx.request(method, self.http_url + path, timeout=30, **kwargs)
        r.raise_for_status()
        try:
            return r.json()
        except ValueError:
            return r.content

    def add_modality(self, name: str, ae_title: str, port: int, host: str = "127.0.0.1") -> None:
        """Declare (or redeclare) a DICOM node Orthanc may send to."""
        self.rest(f"/modalities/{name}", method="PUT",
                  json={"AET": ae_title, "Host": host, "Port": port})

    def upload(self, path: Path) -> dict[str, Any]:
        """Store a DICOM file in Orthanc through REST (``POST /instances``)."""
        return self.rest("/instances", content=Path(path).read_bytes())

    def clear(self) -> None:
        """Delete every patient (studies, series, instances) so a test starts empty."""
        for pid in self.rest("/patients"):
            self.rest(f"/patients/{pid}", method="DELETE")

    def log(self) -> str:
        p = self.folder / "orthanc.log"
        return p.read_text(errors="replace")[-4000:] if p.exists() else ""


def _config(server: OrthancServer, plugin: Path) -> dict[str, Any]:
    return {
        "Name": "meddx-test",
        "StorageDirectory": str(server.folder / "storage"),
        "IndexDirectory": str(server.folder / "storage"),
        "HttpPort": server.http_port,
        "DicomPort": server.dicom_port,
        "DicomAet": server.ae_title,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomModalities": {"meddx": ["MEDDX", "127.0.0.1", server.meddx_port]},
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                     "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        "HttpTimeout": 30,
        "StableAge": 2,
        "SaveJobs": False,
    }


def _wait_ready(server: OrthancServer, deadline_s: float = 30.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if server.process is not None and server.process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {server.process.returncode}:\n{server.log()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.http_url + "/system", timeout=2).status_code in (200, 401):
                return
        time.sleep(0.2)
    raise RuntimeError(f"Orthanc did not answer within {deadline_s:.0f} s:\n{server.log()}")


@contextlib.contextmanager
def running_orthanc(folder: Path, meddx_port: int | None = None,
                    dicom_port: int | None = None,
                    config: dict[str, Any] | None = None) -> Iterator[OrthancServer]:
    """Start Orthanc in ``folder`` (config, storage, log), yield it, stop it (``dicom_port``:
    a given DICOM port, e.g. one a test has so far found closed; ``config``: settings laid
    over the defaults, e.g. authentication)."""
    binary, plugin = orthanc_binary(), dicomweb_plugin()
    if binary is None or plugin is None:
        raise FileNotFoundError("Orthanc or its DICOMweb plugin is not installed "
                                "(make orthanc: apt-get install orthanc orthanc-dicomweb)")
    folder.mkdir(parents=True, exist_ok=True)
    server = OrthancServer(http_port=free_port(), dicom_port=dicom_port or free_port(),
                           meddx_port=meddx_port or free_port(), folder=folder)
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps({**_config(server, plugin), **(config or {})}, indent=1))
    with open(folder / "orthanc.log", "wb") as log:
        server.process = subprocess.Popen([binary, str(config_path)], stdout=log,
                                          stderr=subprocess.STDOUT, cwd=folder)
    try:
        _wait_ready(server)
        yield server
    finally:
        server.process.terminate()
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@pytest.fixture(scope="session", name="orthanc")
def orthanc_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """A real Orthanc PACS on loopback for the whole session."""
    if orthanc_binary() is None or dicomweb_plugin() is None:
        msg = "Orthanc/orthanc-dicomweb not installed (make orthanc)"
        if IN_CI:
            pytest.fail(msg + " (CI=true: a missing PACS is a failure)")
        pytest.skip(msg)
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server
