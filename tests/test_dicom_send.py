"""Results delivered to a real PACS (Orthanc) by C-STORE and STOW-RS, and nothing lost when it is
down: items stay queued across restarts, back off, are delivered exactly once when it comes up,
and are listed as failed (never deleted) when it stays down."""

from __future__ import annotations

import os
import threading

import httpx
import numpy as np
import pydicom
import pytest

from dicom_results_support import ultrasound_study
from meddx.dicom.model import Algorithm, SeriesAnalysis
from meddx.dicom.results import result_datasets
from meddx.dicom.send import Destination, Outbox
from meddx.errors import ConfigError
from meddx.inference.prediction import Prediction
from orthanc_support import free_port, running_orthanc

SHA = "ab" * 32


@pytest.fixture()
def study(tmp_path):
    rng = np.random.default_rng(0)
    return ultrasound_study(rng.integers(0, 255, (2, 28, 28), dtype=np.uint8), tmp_path / "us")


def _results(paths) -> list[pydicom.Dataset]:
    """SR + one heat map for a study (the values are set here: delivery is under test)."""
    heads = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    pred = Prediction(id="s", probabilities={"malignant": 0.8, "normal": 0.2},
                      label="malignant", calibrated={"malignant": 0.7, "normal": 0.3},
                      decision="malignant", operating_point="sensitivity@0.95", threshold=0.4,
                      prediction_set=["malignant"], ood=False, ood_score=1.0,
                      model={"name": "m", "version": "1", "sha256": SHA,
                             "positive_class": "malignant"})
    analysis = SeriesAnalysis(
        study_uid=heads[0].StudyInstanceUID, series_uid=heads[0].SeriesInstanceUID,
        sources=tuple(paths), algorithm=Algorithm("m", "1", SHA), prediction=pred,
        heatmaps=((str(heads[0].SOPInstanceUID), np.linspace(0, 1, 28 * 28).reshape(28, 28)),))
    return result_datasets(analysis)


def _qido_sr(server, study_uid: str) -> list[str]:
    """SOP Instance UIDs of the SR objects Orthanc holds in the study, by QIDO-RS."""
    r = httpx.get(f"{server.dicomweb_url}/studies/{study_uid}/instances",
                  params={"Modality": "SR"}, headers={"Accept": "application/dicom+json"},
                  timeout=10)
    if r.status_code == 204 or not r.content:
        return []
    r.raise_for_status()
    return [i["00080018"]["Value"][0] for i in r.json()]


def _in_orthanc(server, sop_uid: str) -> int:
    return len(server.rest("/tools/lookup", content=sop_uid.encode()))


def _dimse(server, **kw) -> Destination:
    return Destination(kind="dimse", host="127.0.0.1", port=server.dicom_port,
                       ae_title=server.ae_title, **kw)


@pytest.mark.parametrize("kind", ["dimse", "dicomweb"])
def test_results_land_in_the_source_study(orthanc, study, tmp_path, kind):
    for p in study:
        orthanc.upload(p)
    results = _results(study)
    dest = _dimse(orthanc) if kind == "dimse" else Destination(kind="dicomweb",
                                                               url=orthanc.dicomweb_url)
    box = Outbox(tmp_path / "outbox.db")
    ids = box.enqueue(results, dest)
    report = box.deliver()
    assert sorted(report.sent) == sorted(ids) and not report.deferred and not report.failed
    study_uid = str(results[0].StudyInstanceUID)
    assert _qido_sr(orthanc, study_uid) == [str(results[0].SOPInstanceUID)]
    # the heat map is in the same study too, and the study still holds the source images
    series = orthanc.rest(f"/studies/{orthanc.rest('/tools/lookup', content=study_uid.encode())[0]['ID']}/series")
    modalities = sorted(s["MainDicomTags"].get("Modality", "") for s in series)
    assert modalities == ["OT", "SR", "US"]
    assert box.pending() == [] and [i.id for i in box.sent()] == ids
    assert box.deliver().attempted == 0  # nothing is sent twice


def test_down_destination_keeps_items_queued_across_restart_then_delivers_once(study, tmp_path):
    port = free_port()  # nothing listens here yet
    dest = Destination(kind="dimse", host="127.0.0.1", port=port, ae_title="ORTHANC",
                       timeout_s=5)
    box = Outbox(tmp_path / "outbox.db", base_delay_s=10)
    results = _results(study)
    ids = box.enqueue(results, dest, now=1000.0)
    first = box.deliver(now=1000.0)
    assert sorted(first.deferred) == sorted(ids) and first.sent == [] and dest.name in first.errors
    assert box.deliver(now=1005.0).attempted == 0  # backing off: not due before 1010
    second = box.deliver(now=1010.0)
    assert sorted(second.deferred) == sorted(ids)
    waits = [i.next_attempt - 1010.0 for i in box.pending()]
    assert waits == [20.0] * len(ids)  # doubled after the second failure
    box.close()

    restarted = Outbox(tmp_path / "outbox.db", base_delay_s=10)  # a new process, same db
    pending = restarted.pending()
    assert [i.id for i in pending] == ids and all(i.attempts == 2 for i in pending)
    assert all(i.path.exists() for i in pending)
    with running_orthanc(tmp_path / "pacs", dicom_port=port) as pacs:  # it comes up
        third = restarted.deliver(now=1030.0)
        assert sorted(third.sent) == sorted(ids)
        assert restarted.deliver(now=99999.0).attempted == 0
        restarted.enqueue(results, dest)  # queued again: already sent, not queued twice
        assert restarted.deliver(now=99999.0).attempted == 0
        for ds in results:
            assert _in_orthanc(pacs, str(ds.SOPInstanceUID)) == 1
        assert len(pacs.rest("/instances")) == len(results)


def test_destination_that_stays_down_lists_items_as_failed_never_deleted(study, tmp_path):
    dest = Destination(kind="dicomweb", url=f"http://127.0.0.1:{free_port()}/dicom-web",
                       timeout_s=5)
    box = Outbox(tmp_path / "outbox.db", max_attempts=3, base_delay_s=1)
    ids = box.enqueue(_results(study), dest, now=0.0)
    for now in (0.0, 1.0, 3.0):
        box.deliver(now=now)
    failed = box.failed()
    assert [i.id for i in failed] == ids and box.pending() == []
    for item in failed:
        assert "cannot be reached" in item.last_error and "after 3 attempt(s)" in item.last_error
        assert item.path.exists() and item.attempts == 3
    box.retry(ids[:1], now=10.0)  # the operator puts one back
    assert [i.id for i in box.pending()] == ids[:1]


def test_destination_refusal_fails_at_once_with_the_status(study, tmp_path):
    """A real pynetdicom Storage SCP that answers 0xC000 (cannot understand)."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    ae = AE(ae_title="REFUSER")
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    scp = ae.start_server(("127.0.0.1", port), block=False,
                          evt_handlers=[(evt.EVT_C_STORE, lambda event: 0xC000)])
    try:
        box = Outbox(tmp_path / "outbox.db")
        ids = box.enqueue(_results(study)[:1], Destination(
            kind="dimse", host="127.0.0.1", port=port, ae_title="REFUSER"))
        report = box.deliver()
        assert report.failed == ids
        assert "0xC000" in box.failed()[0].last_error
    finally:
        scp.shutdown()


def test_destination_config_is_checked_and_credentials_never_literal(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown key 'password'") as e:
        Destination.parse({"kind": "dicomweb", "url": "http://x", "password": "secret"})
    assert "credentials_file" in e.value.hint
    with pytest.raises(ConfigError, match="host, port and ae_title"):
        Destination.parse({"kind": "dimse", "host": "pacs"})
    with pytest.raises(ConfigError, match="exactly one of"):
        Destination.parse({"kind": "dicomweb", "url": "http://x", "auth": "bearer"})
    monkeypatch.setenv("MEDDX_TEST_TOKEN", "tok123")
    dest = Destination.parse({"kind": "dicomweb", "url": "http://x", "auth": "bearer",
                              "credentials_env": "MEDDX_TEST_TOKEN"})
    assert dest.secret() == "tok123" and "tok123" not in dest.key
    missing = Destination(kind="dicomweb", url="http://x", auth="basic",
                          credentials_file=tmp_path / "nope")
    with pytest.raises(ConfigError, match="cannot be read"):
        missing.secret()
    (tmp_path / "basic").write_text("user-only\n")
    with pytest.raises(ConfigError, match="user:password"):
        Destination(kind="dicomweb", url="http://x", auth="basic",
                    credentials_file=tmp_path / "basic").secret()


def test_concurrent_enqueue_of_the_same_object_queues_it_once(study, tmp_path):
    box = Outbox(tmp_path / "outbox.db")
    dest = Destination(kind="dicomweb", url="http://127.0.0.1:9/dicom-web")
    results = _results(study)
    got: list[list[int]] = []
    threads = [threading.Thread(target=lambda: got.append(box.enqueue(results, dest)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({tuple(g) for g in got}) == 1 and len(box.pending()) == len(results)
    assert len(os.listdir(box.files)) == len(results)


def test_concurrent_deliveries_send_each_object_once(study, tmp_path):
    """Four threads deliver at once to a real (pynetdicom) Storage SCP that answers slowly:
    every object arrives exactly once."""
    import time
    from collections import Counter

    from pynetdicom import AE, AllStoragePresentationContexts, evt

    received: Counter[str] = Counter()

    def store(event):
        time.sleep(0.3)
        received[str(event.request.AffectedSOPInstanceUID)] += 1
        return 0x0000

    ae = AE(ae_title="SLOW")
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    scp = ae.start_server(("127.0.0.1", port), block=False,
                          evt_handlers=[(evt.EVT_C_STORE, store)])
    try:
        box = Outbox(tmp_path / "outbox.db")
        results = _results(study)
        box.enqueue(results, Destination(kind="dimse", host="127.0.0.1", port=port,
                                         ae_title="SLOW"))
        threads = [threading.Thread(target=box.deliver) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert received == Counter({str(ds.SOPInstanceUID): 1 for ds in results})
        assert len(box.sent()) == len(results)
    finally:
        scp.shutdown()


def test_stow_rs_with_basic_credentials_from_a_file(study, tmp_path):
    """An Orthanc that requires HTTP basic authentication: without credentials the object is
    refused and waits; with ``user:password`` read from a file it is stored."""
    users = {"meddx": "s3cret-pw"}
    with running_orthanc(tmp_path / "pacs", config={"AuthenticationEnabled": True,
                                                    "RegisteredUsers": users}) as pacs:
        results = _results(study)[:1]
        box = Outbox(tmp_path / "outbox.db", base_delay_s=1)
        anonymous = Destination(kind="dicomweb", url=pacs.dicomweb_url, name="anon")
        box.enqueue(results, anonymous, now=0.0)
        report = box.deliver(now=0.0)
        assert report.deferred and "HTTP 401" in box.pending()[0].last_error
        secret = tmp_path / "pacs-credentials"
        secret.write_text("meddx:s3cret-pw\n")
        signed = Destination(kind="dicomweb", url=pacs.dicomweb_url, auth="basic",
                             credentials_file=secret, name="signed")
        (item,) = box.enqueue(results, signed, now=0.0)
        assert box.deliver(now=0.0).sent == [item]
        r = httpx.get(f"{pacs.http_url}/instances", auth=("meddx", "s3cret-pw"), timeout=10)
        assert len(r.json()) == 1
        assert "s3cret-pw" not in (tmp_path / "outbox.db").read_bytes().decode("latin-1")
