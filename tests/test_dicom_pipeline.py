"""The pipeline: complete studies routed to models, one analysis per series and model, every
instance ending analysed or failed with its reason, restarts and repeats without a second SR."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("highdicom")

from pydicom import Dataset, dcmread  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from conftest import require_data  # noqa: E402
from dicom_support import (  # noqa: E402
    breast_package,
    breast_study,
    ct_series,
    receive,  # noqa: E402
    volume_package,
)
from meddx.dicom.pipeline import Pipeline, ordered_volume  # noqa: E402
from meddx.dicom.routing import Route, RoutingConfig, Selection  # noqa: E402
from meddx.dicom.store import Store  # noqa: E402
from meddx.inference import load_model  # noqa: E402


def _pipeline(work: Path, packages: list, routing: RoutingConfig | None = None) -> Pipeline:
    from meddx.dicom.send import Destination, Outbox

    dest = Destination(kind="dimse", host="127.0.0.1", port=1, ae_title="NOWHERE")
    return Pipeline(Store(work), [load_model(p.path) for p in packages],
                    Outbox(work / "outbox.sqlite"), dest, routing, quiet=5.0)


BREAST_ONLY = RoutingConfig(routes=(Route(model="breast-tiny",
                                          select=Selection(modality=("US",))),))


@pytest.fixture(scope="module")
def breast_pkg(tmp_path_factory: pytest.TempPathFactory):
    return breast_package(tmp_path_factory.mktemp("breast"))


@pytest.fixture(scope="module")
def volume_pkg(tmp_path_factory: pytest.TempPathFactory):
    return volume_package(tmp_path_factory.mktemp("vol"))


def test_2d_series_one_analysis_max_risk_and_heatmaps(tmp_path: Path, breast_pkg,
                                                      breast_npz: Path) -> None:
    pipe = _pipeline(tmp_path, [breast_pkg], BREAST_ONLY)
    study = breast_study(breast_npz, 3)
    receive(pipe.store, study, now=100.0)
    assert pipe.process_ready(now=102.0) == []  # still inside the quiet interval
    assert pipe.process_ready(now=106.0) == [pipe.store.study_key(str(study[0].StudyInstanceUID))]
    (analysis,) = pipe.store.analyses()
    assert analysis["state"] == "queued" and len(analysis["result_uids"]) == 1 + 3  # SR + maps
    pred = analysis["prediction"]
    risks = []
    for ds in study:  # the series answer is the most suspicious image's
        (p,) = pipe.models[0].predictor.predict(_path(pipe, ds))
        risks.append(p.risk)
    assert pred["id"] == str(study[int(np.argmax(risks))].SOPInstanceUID)
    counts = pipe.store.counts()
    assert counts["analysed"] == 3 and counts["failed"] == 0 and counts["pending"] == 0
    assert {i.sop_instance_uid for i in pipe.outbox.pending()} == set(analysis["result_uids"])
    from meddx.dicom.worklist import load_worklist

    (entry,) = load_worklist(pipe.store.path, include_uid=True)  # the study is on the worklist
    assert entry.study_uid == str(study[0].StudyInstanceUID)
    assert entry.study_key == pipe.store.study_key(entry.study_uid)
    assert entry.risk == pytest.approx(max(risks), abs=1e-6)


def _path(pipe: Pipeline, ds: Dataset) -> Path:
    return pipe.store.work / "instances" / pipe.store.study_key(str(ds.StudyInstanceUID)) / \
        f"{ds.SOPInstanceUID}.dcm"


def test_series_nobody_accepts_unsupported_and_undecodable_are_listed(
        tmp_path: Path, breast_pkg, breast_npz: Path) -> None:
    pipe = _pipeline(tmp_path, [breast_pkg], BREAST_ONLY)
    ct = dcmread(require_data("dicom/CT_small.dcm"))
    sr = copy.deepcopy(breast_study(breast_npz, 1)[0])
    for name in ("PixelData", "Rows", "Columns"):
        delattr(sr, name)
    sr.SeriesInstanceUID, sr.SOPInstanceUID = generate_uid(), generate_uid()
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    broken = breast_study(breast_npz, 1, study_uid=str(sr.StudyInstanceUID))[0]
    broken.PixelData = broken.PixelData[:100]  # truncated in transit
    receive(pipe.store, [ct, sr, broken])
    pipe.process_ready(now=1e12)
    reasons = {f["sop_uid"]: (f["reason"], f["detail"]) for f in pipe.store.failures()}
    assert reasons[str(ct.SOPInstanceUID)][0] == "no-matching-model"
    assert "breast-tiny: Modality CT not in ['US']" in reasons[str(ct.SOPInstanceUID)][1]
    assert reasons[str(sr.SOPInstanceUID)][0] == "unsupported-sop-class"
    assert reasons[str(broken.SOPInstanceUID)][0] == "decode-failure"
    c = pipe.store.counts()
    assert c["received"] == c["failed"] == 3 and pipe.store.analyses() == []


def test_3d_model_gets_the_series_as_a_volume_ordered_by_position(tmp_path: Path,
                                                                   volume_pkg) -> None:
    ct = require_data("dicom/CT_small.dcm")
    series = ct_series(ct, 9)  # shuffled, Instance Numbers reversed
    paths = []
    for i, ds in enumerate(series):
        paths.append(tmp_path / f"{i}.dcm")
        ds.save_as(paths[-1])
    volume, order, spacing = ordered_volume(paths)
    assert volume.shape == (9, 128, 128) and spacing[0] == pytest.approx(2.5)
    intercept = float(dcmread(ct).RescaleIntercept)
    assert [int(v - intercept) for v in volume[:, 0, 0]] == list(range(9))

    pipe = _pipeline(tmp_path / "work", [volume_pkg])
    receive(pipe.store, series)
    pipe.process_ready(now=1e12)
    (analysis,) = pipe.store.analyses()
    assert analysis["model"] == "ct-volume-untrained"
    assert pipe.store.counts()["analysed"] == 9
    assert 1 < len(analysis["result_uids"]) <= 1 + 3  # SR + heat maps on the hottest slices


def test_killed_after_queueing_restarts_without_a_second_result(
        tmp_path: Path, breast_pkg, breast_npz: Path, monkeypatch) -> None:
    pipe = _pipeline(tmp_path, [breast_pkg], BREAST_ONLY)
    study = breast_study(breast_npz, 2)
    receive(pipe.store, study)

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("killed between queueing and bookkeeping")

    monkeypatch.setattr(Store, "mark_queued", killed)
    with pytest.raises(KeyboardInterrupt):
        pipe.process_ready(now=1e12)
    monkeypatch.undo()
    first = {i.sop_instance_uid for i in pipe.outbox.pending()}
    assert len(first) == 1 + 2  # SR + heat maps queued before the kill
    again = _pipeline(tmp_path, [breast_pkg], BREAST_ONLY)  # the restarted process
    assert again.store.complete_studies(5.0, now=1e12)  # the half-done study is found
    again.process_ready(now=1e12)
    assert again.store.counts()["pending"] == 0
    (analysis,) = again.store.analyses()
    uids = analysis["result_uids"]
    # the repeated analysis made the same objects, so nothing new is queued (and a PACS that
    # got them before the kill stores them once)
    assert set(uids) == first == {i.sop_instance_uid for i in again.outbox.pending()}
    # the same instances sent once more: duplicates, no new analysis
    receive(again.store, study)
    again.process_ready(now=1e12)
    assert len(again.store.analyses()) == 1 and again.store.counts()["duplicates"] == 2


def test_logs_name_studies_by_salted_key_and_deid_strips_results(
        tmp_path: Path, breast_pkg, breast_npz: Path, caplog) -> None:
    import logging

    pipe = _pipeline(tmp_path, [breast_pkg], BREAST_ONLY)
    pipe.deid = True
    study = breast_study(breast_npz, 1)
    receive(pipe.store, study)
    with caplog.at_level(logging.DEBUG):
        pipe.process_ready(now=1e12)
    text = caplog.text
    assert pipe.store.study_key(str(study[0].StudyInstanceUID)) in text
    for phi in ("Doe^Jane", "BRST-0001", "ACC123", str(study[0].StudyInstanceUID)):
        assert phi not in text
    audit = (pipe.store.work / "audit.jsonl").read_text()
    for phi in ("Doe^Jane", "BRST-0001", "ACC123", str(study[0].StudyInstanceUID),
                str(study[0].SOPInstanceUID)):
        assert phi not in audit
    from meddx.monitoring.logs import read_audit

    data = read_audit(tmp_path / "audit.jsonl")  # the format `meddx monitor` reads
    assert len(data.answered) == 1 and data.answered[0].model == "breast-tiny"
    assert data.answered[0].request_id == pipe.store.study_key(str(study[0].StudyInstanceUID))
    assert pipe.store.counts()["analysed"] == 1 and not pipe.store.failures()
    assert len(pipe.outbox.pending()) == 2  # SR + heat map
    for item in pipe.outbox.pending():  # --deid: the research copies carry no identity
        ds = dcmread(item.path)
        assert ds.get("PatientName", "") != "Doe^Jane" and ds.PatientID != "BRST-0001"
        assert ds.get("AccessionNumber", "") in ("", None)
        assert ds.StudyInstanceUID != study[0].StudyInstanceUID


def test_out_of_distribution_gets_an_sr_without_decision_and_is_listed(
        tmp_path: Path, breast_npz: Path) -> None:
    from dicom_support import breast_package as make

    pkg = make(tmp_path / "pkg", ood_threshold=-1e6)  # everything is outside the training data
    pipe = _pipeline(tmp_path / "work", [pkg], BREAST_ONLY)
    receive(pipe.store, breast_study(breast_npz, 2))
    pipe.process_ready(now=1e12)
    (analysis,) = pipe.store.analyses()
    assert analysis["prediction"]["ood"] is True and analysis["prediction"]["decision"] is None
    (failure,) = pipe.store.failures()
    assert failure["reason"] == "ood" and "no decision" in failure["detail"]
    assert pipe.store.counts()["analysed"] == 2


def test_a_failing_writer_lists_the_series_instead_of_looping(
        tmp_path: Path, breast_pkg, breast_npz: Path, monkeypatch) -> None:
    import meddx.dicom.results as results

    def broken(analysis: object, **kwargs: object) -> list:
        raise ValueError("highdicom refused a value")

    monkeypatch.setattr(results, "result_datasets", broken)
    pipe = _pipeline(tmp_path, [breast_pkg], BREAST_ONLY)
    receive(pipe.store, breast_study(breast_npz, 2))
    pipe.process_ready(now=1e12)
    assert pipe.store.complete_studies(5.0, now=1e12) == []  # not picked up again and again
    reasons = {f["reason"] for f in pipe.store.failures()}
    assert reasons == {"model-error"} and pipe.store.counts()["failed"] == 2
