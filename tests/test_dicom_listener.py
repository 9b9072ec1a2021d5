"""The C-STORE SCP against a real pynetdicom SCU: allow list, limits, DIMSE failure statuses."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("pynetdicom")

from pydicom import dcmread  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import CTImageStorage, Verification  # noqa: E402

from conftest import require_data  # noqa: E402
from meddx.dicom.listener import Listener, ListenerConfig, parse_allow  # noqa: E402
from meddx.dicom.store import Store  # noqa: E402
from meddx.errors import ConfigError  # noqa: E402


@pytest.fixture()
def ct() -> object:
    return dcmread(require_data("dicom/CT_small.dcm"))


def _listener(tmp_path: Path, **config: object) -> Listener:
    config.setdefault("allow", {"PACS": None})
    listener = Listener(Store(tmp_path / "work"), ListenerConfig(port=0, host="127.0.0.1",
                                                                 **config))
    listener.start()
    return listener


@pytest.fixture()
def node(tmp_path: Path) -> Iterator[Listener]:
    listener = _listener(tmp_path)
    yield listener
    listener.stop()


def _assoc(port: int, calling: str = "PACS"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="MEDDX")


def test_echo_and_store_goes_to_disk_and_state(node: Listener, ct: object) -> None:
    assoc = _assoc(node.port)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assert assoc.send_c_store(ct).Status == 0
    assert assoc.send_c_store(ct).Status == 0  # the same SOP Instance UID again
    assoc.release()
    (row,) = node.store.pending_instances(str(ct.StudyInstanceUID))
    assert row.path.is_file() and row.path.is_relative_to(node.store.work / "instances")
    assert dcmread(row.path).SOPInstanceUID == ct.SOPInstanceUID
    assert str(ct.StudyInstanceUID) not in str(row.path)  # folders named by the salted key
    assert node.store.counts()["duplicates"] == 1


def test_unknown_calling_ae_or_host_is_rejected(tmp_path: Path) -> None:
    listener = _listener(tmp_path, allow=parse_allow(["PACS@10.11.12.13", "CT1"]))
    try:
        evil = _assoc(listener.port, "EVIL")
        assert evil.is_rejected and not evil.is_established
        wrong_host = _assoc(listener.port, "PACS")  # allowed AE title, but not from here
        assert wrong_host.is_rejected
        ok = _assoc(listener.port, "CT1")
        assert ok.is_established
        ok.release()
    finally:
        listener.stop()
    with pytest.raises(ConfigError, match="accepts no one"):
        Listener(Store(tmp_path / "w2"), ListenerConfig(port=0))
    with pytest.raises(ConfigError, match="1 to 16"):
        parse_allow(["A" * 17])


def test_bad_instances_get_a_failure_status_with_reason(node: Listener, ct: object) -> None:
    assoc = _assoc(node.port)
    no_study = copy.deepcopy(ct)
    del no_study.StudyInstanceUID
    no_study.SOPInstanceUID = generate_uid()
    rsp = assoc.send_c_store(no_study)
    assert rsp.Status == 0xC000 and "missing" in rsp.ErrorComment
    assert assoc.send_c_store(ct).Status == 0  # the node still works after a bad instance
    assoc.release()
    assert node.store.counts()["received"] == 1


def test_limits_size_instances_per_study_associations_per_ae(tmp_path: Path, ct: object) -> None:
    listener = _listener(tmp_path, max_instance_bytes=100_000, max_instances_per_study=2,
                         max_associations_per_ae=1)
    try:
        first = _assoc(listener.port)
        second = _assoc(listener.port)  # the same AE while the first is open
        assert first.is_established and second.is_rejected
        for i in range(3):
            ds = copy.deepcopy(ct)
            ds.SOPInstanceUID = generate_uid()
            rsp = first.send_c_store(ds)
            assert rsp.Status == (0 if i < 2 else 0xA700)
        assert "2-instance limit" in rsp.ErrorComment
        big = copy.deepcopy(ct)
        big.SOPInstanceUID, big.StudyInstanceUID = generate_uid(), generate_uid()
        big.PixelData = bytes(200_000)
        big.Rows = big.Columns = 316
        rsp = first.send_c_store(big)
        assert rsp.Status == 0xA700 and "byte limit" in rsp.ErrorComment
        first.release()
    finally:
        listener.stop()
