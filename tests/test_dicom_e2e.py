"""End to end against a real PACS (Orthanc): studies pushed into Orthanc reach meddx by C-STORE
(Orthanc sends them) or by DICOMweb (meddx watches), and the SR and heat maps appear in the same
study in Orthanc, found by QIDO-RS and read back with pydicom and highdicom."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("highdicom")

import highdicom as hd  # noqa: E402
from pydicom import dcmread  # noqa: E402

from conftest import require_data  # noqa: E402
from dicom_support import breast_package, breast_study  # noqa: E402
from meddx.dicom.listener import Listener, ListenerConfig  # noqa: E402
from meddx.dicom.pipeline import Pipeline  # noqa: E402
from meddx.dicom.routing import Route, RoutingConfig, Selection  # noqa: E402
from meddx.dicom.send import Destination, Outbox  # noqa: E402
from meddx.dicom.store import Store  # noqa: E402
from meddx.dicom.watch import Watcher, make_client, read_credentials  # noqa: E402
from meddx.errors import ConfigError  # noqa: E402
from meddx.inference import load_model  # noqa: E402

ROUTING = RoutingConfig(routes=(Route(model="breast-tiny", select=Selection(modality=("US",))),))
SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.22"}


@pytest.fixture(scope="module")
def breast_pkg(tmp_path_factory: pytest.TempPathFactory):
    return breast_package(tmp_path_factory.mktemp("breast_e2e"))


def _push(orthanc, datasets, folder: Path) -> str:
    """Store datasets in Orthanc (as a modality would); Orthanc's id of their study."""
    folder.mkdir(parents=True, exist_ok=True)
    study = None
    for i, ds in enumerate(datasets):
        path = folder / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        study = orthanc.upload(path)["ParentStudy"]
    return str(study)


def _series_in_study(orthanc, study_uid: str) -> list[dict]:
    client = make_client(orthanc.dicomweb_url)
    return client.search_for_series(study_instance_uid=study_uid)


def _instances(orthanc, study_uid: str, modality: str) -> list:
    client = make_client(orthanc.dicomweb_url)
    out = []
    for s in _series_in_study(orthanc, study_uid):
        if s["00080060"]["Value"][0] != modality:
            continue
        series_uid = s["0020000E"]["Value"][0]
        out += list(client.iter_series(study_uid, series_uid))
    return out


@pytest.fixture()
def node(orthanc, tmp_path: Path, breast_pkg) -> Iterator[tuple[Pipeline, Listener]]:
    orthanc.clear()
    store = Store(tmp_path / "work")
    dest = Destination(kind="dimse", host="127.0.0.1", port=orthanc.dicom_port,
                       ae_title=orthanc.ae_title)
    pipe = Pipeline(store, [load_model(breast_pkg.path)], Outbox(tmp_path / "work" /
                    "outbox.sqlite"), dest, ROUTING, quiet=1.0)
    listener = Listener(store, ListenerConfig(port=0, host="127.0.0.1",
                                              allow={orthanc.ae_title: "127.0.0.1"}))
    listener.start()
    orthanc.add_modality("meddx", "MEDDX", listener.port)
    yield pipe, listener
    listener.stop()


def _settle(pipe: Pipeline) -> None:
    pipe.process_ready(now=time.time() + 60)
    report = pipe.outbox.deliver()
    assert not report.failed and not report.deferred, report.errors


@pytest.mark.slow
def test_orthanc_sends_meddx_answers_into_the_same_study(orthanc, node, tmp_path: Path,
                                                          breast_npz: Path) -> None:
    pipe, _ = node
    us = breast_study(breast_npz, 3)
    study_uid = str(us[0].StudyInstanceUID)
    ct = dcmread(require_data("dicom/CT_small.dcm"))
    us_id = _push(orthanc, us, tmp_path / "us")
    ct_id = _push(orthanc, [ct], tmp_path / "ct")
    orthanc.rest("/modalities/meddx/store", json=[us_id, ct_id])  # Orthanc → C-STORE → meddx
    assert pipe.store.counts()["received"] == 4
    _settle(pipe)

    (sr,) = _instances(orthanc, study_uid, "SR")  # found by QIDO-RS, fetched by WADO-RS
    report = hd.sr.ComprehensiveSR.from_dataset(sr)
    assert report.StudyInstanceUID == study_uid and report.PatientID == us[0].PatientID
    referenced = {str(r.ReferencedSOPInstanceUID)
                  for item in sr.CurrentRequestedProcedureEvidenceSequence
                  for s in item.ReferencedSeriesSequence
                  for r in s.ReferencedSOPSequence}
    assert referenced == {str(ds.SOPInstanceUID) for ds in us}
    heatmaps = [ds for m in ("OT", "US") for ds in _instances(orthanc, study_uid, m)
                if ds.get("Manufacturer") == "meddx"]
    assert len(heatmaps) == 3 and all(ds.PhotometricInterpretation == "RGB" for ds in heatmaps)
    # the CT study got no result but is listed with the reason, and nothing is lost
    assert not _instances(orthanc, str(ct.StudyInstanceUID), "SR")
    (failure,) = pipe.store.failures()
    assert failure["reason"] == "no-matching-model" and "Modality CT" in failure["detail"]
    c = pipe.store.counts()
    assert c["received"] == c["analysed"] + c["failed"] == 4

    # the PACS sends the study again: duplicates, no second SR
    orthanc.rest("/modalities/meddx/store", json=[us_id])
    _settle(pipe)
    assert pipe.store.counts()["duplicates"] == 3
    assert len(_instances(orthanc, study_uid, "SR")) == 1


@pytest.mark.slow
def test_a_pacs_not_on_the_allow_list_cannot_send(orthanc, node, tmp_path: Path,
                                                  breast_npz: Path) -> None:
    pipe, listener = node
    orthanc.add_modality("meddx-wrong-ae", "MEDDX", listener.port)
    listener.config = listener.config.model_copy(update={"allow": {"SOMEONE": None}})
    study_id = _push(orthanc, breast_study(breast_npz, 1), tmp_path / "us")
    with pytest.raises(httpx.HTTPStatusError):
        orthanc.rest("/modalities/meddx-wrong-ae/store", json=[study_id])
    assert pipe.store.counts()["received"] == 0


@pytest.mark.slow
def test_watch_over_dicomweb_and_stow_back(orthanc, tmp_path: Path, breast_pkg,
                                           breast_npz: Path) -> None:
    orthanc.clear()
    us = breast_study(breast_npz, 2, start=10)
    study_uid = str(us[0].StudyInstanceUID)
    _push(orthanc, us, tmp_path / "us")
    store = Store(tmp_path / "work")
    dest = Destination(kind="dicomweb", url=orthanc.dicomweb_url)
    pipe = Pipeline(store, [load_model(breast_pkg.path)], Outbox(tmp_path / "work" /
                    "outbox.sqlite"), dest, ROUTING, quiet=1.0)
    watcher = Watcher(make_client(orthanc.dicomweb_url), store)
    assert watcher.poll() == 2
    assert watcher.poll() == 0  # nothing new: nothing retrieved again
    _settle(pipe)
    (sr,) = _instances(orthanc, study_uid, "SR")
    assert sr.StudyInstanceUID == study_uid and sr.Manufacturer == "meddx"
    assert watcher.poll() == 0  # meddx's own results are in the study now, but not new images
    pipe.process_ready(now=time.time() + 60)
    assert len(store.analyses()) == 1


def test_credentials_come_from_a_file_or_the_environment(tmp_path: Path, monkeypatch) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    assert read_credentials(token) == {"Authorization": "Bearer s3cret"}
    monkeypatch.setenv("PACS_AUTH", "alice:pw")
    assert read_credentials(env="PACS_AUTH", kind="basic") == {
        "Authorization": "Basic YWxpY2U6cHc="}
    monkeypatch.setenv("EMPTY_AUTH", "")
    with pytest.raises(ConfigError, match="empty"):
        read_credentials(env="EMPTY_AUTH")
    with pytest.raises(ConfigError, match="not both"):
        read_credentials(token, "PACS_AUTH")


def _meddx(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-m", "meddx.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def _wait_port(port: int, proc: subprocess.Popen, seconds: float = 120) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError("meddx dicom listen did not open its port")


@pytest.mark.slow
def test_cli_node_killed_mid_study_finishes_it_after_restart(orthanc, tmp_path: Path,
                                                             breast_pkg, breast_npz: Path) -> None:
    """`meddx dicom listen` as a real process: killed (SIGKILL) after the study arrived and
    before it was analysed, then started again: the study is finished, one SR in Orthanc."""
    from orthanc_support import free_port

    orthanc.clear()
    port, work = free_port(), tmp_path / "work"
    orthanc.add_modality("meddx", "MEDDX", port)
    args = ["dicom", "listen", str(breast_pkg.path), "--port", str(port), "--allow",
            f"{orthanc.ae_title}@127.0.0.1", "--work", str(work),
            "--dest", f"{orthanc.ae_title}@127.0.0.1:{orthanc.dicom_port}"]
    first = _meddx(*args, "--quiet", "600")
    try:
        _wait_port(port, first)
        us = breast_study(breast_npz, 2, start=20)
        orthanc.rest("/modalities/meddx/store", json=[_push(orthanc, us, tmp_path / "us")])
    finally:
        first.kill()  # mid-study: received, never analysed
        first.wait()
    study_uid = str(us[0].StudyInstanceUID)
    assert not _instances(orthanc, study_uid, "SR")
    second = _meddx(*args, "--quiet", "1", "--duration", "15")
    out = second.communicate(timeout=300)[0].decode()
    assert second.returncode == 0, out
    (sr,) = _instances(orthanc, study_uid, "SR")
    assert sr.Manufacturer == "meddx"
    assert "Doe^Jane" not in out and study_uid not in out and str(us[0].SOPInstanceUID) not in out

    status = subprocess.run([sys.executable, "-m", "meddx.cli", "dicom", "status", "--work",
                             str(work), "--json"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["counts"]["received"] == data["counts"]["analysed"] == 2
    assert data["pending_deliveries"] == [] and data["failed_deliveries"] == []
    queue = subprocess.run([sys.executable, "-m", "meddx.cli", "dicom", "queue", "--work",
                            str(work), "--json"], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert queue.returncode == 0, queue.stderr
    (entry,) = json.loads(queue.stdout)["studies"]
    assert entry["priority"] in ("stat", "urgent", "routine") and 0 <= entry["risk"] <= 1
    assert "study_uid" not in entry and study_uid not in queue.stdout  # the key only
