"""Whole-slide images through the PACS path: a VL Whole Slide Microscopy series (two pyramid
levels made from the bundled SVS) is routed to a slide model, read as one slide, answered at
slide level; the SR references the slide, the attention map is a Secondary Capture in the same
study, and the worklist ranks the study."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("highdicom")
pytest.importorskip("wsidicom")

import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from conftest import require_data  # noqa: E402
from dicom_results_support import slide_instance  # noqa: E402
from dicom_support import receive  # noqa: E402
from meddx.dicom.pipeline import Pipeline  # noqa: E402
from meddx.dicom.routing import VL_WSM, ModelSlot, RoutingConfig, choose, series_info  # noqa: E402
from meddx.dicom.store import Store  # noqa: E402
from meddx.inference import load_model  # noqa: E402
from pathology_model_support import untrained_slide_package  # noqa: E402

SLIDE = "pathology/CMU-1-Small-Region.svs"


def wsm_series(svs: Path, folder: Path, downsamples: tuple[int, ...] = (2, 8)
               ) -> list[pydicom.Dataset]:
    """One slide as a VL WSM series: one tiled instance per pyramid level, sharing study,
    series, frame of reference, container and specimen (what a DICOM scanner sends)."""
    study, series, frame, specimen = (generate_uid() for _ in range(4))
    out = []
    for i, d in enumerate(downsamples):
        ds = pydicom.dcmread(slide_instance(svs, folder / f"level{d}", downsample=d))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SpecimenDescriptionSequence[0].SpecimenUID = specimen
        ds.InstanceNumber = i + 1
        out.append(ds)
    return out


def slide_package(out: Path):
    """Tiles of 32 px at 4 µm/px (about a hundred tiles on the bundled slide)."""
    return untrained_slide_package(out, name="slide-tiny", mpp=4.0)


def _pipeline(work: Path, packages: list) -> Pipeline:
    from meddx.dicom.send import Destination, Outbox

    dest = Destination(kind="dimse", host="127.0.0.1", port=1, ae_title="NOWHERE")
    return Pipeline(Store(work), [load_model(p.path) for p in packages],
                    Outbox(work / "outbox.sqlite"), dest, quiet=5.0)


@pytest.fixture(scope="module")
def slide_pkg(tmp_path_factory: pytest.TempPathFactory):
    return slide_package(tmp_path_factory.mktemp("slide_pkg"))


@pytest.fixture(scope="module")
def slide_series(tmp_path_factory: pytest.TempPathFactory) -> list[pydicom.Dataset]:
    return wsm_series(require_data(SLIDE), tmp_path_factory.mktemp("wsm"))


def test_routing_sends_a_wsm_series_to_the_slide_model_only(slide_pkg, slide_series,
                                                            tmp_path: Path) -> None:
    """The slide model takes the WSM series (the card's modality reads slides; no name is
    compared); an image model refuses it, and the slide model refuses an image series."""
    from meddx.package import ModelCard
    from meddx.tasks import TaskSpec

    image_card = ModelCard(name="breast", modality="image", task=TaskSpec(
        kind="binary", class_names=["benign", "malignant"], positive_class="malignant"),
        network={"name": "resnet18", "options": {}},
        preprocessing={"spatial_dims": 2, "channels": 1, "size": 28})
    routing = RoutingConfig()
    slide_slot = ModelSlot.from_card(slide_pkg.card, routing)
    image_slot = ModelSlot.from_card(image_card, routing)
    assert slide_slot.slide and not image_slot.slide
    info = series_info(slide_series[0], len(slide_series))
    assert info.sop_class == VL_WSM
    accepted, _ = choose([image_slot, slide_slot], info)
    assert accepted == [slide_slot]
    accepted, why = choose([image_slot], info)
    assert accepted == [] and "whole-slide model" in why
    us = pydicom.Dataset()
    us.update({"Modality": "US", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.6.1", "Rows": 28,
               "Columns": 28, "PhotometricInterpretation": "MONOCHROME2"})
    accepted, why = choose([slide_slot], series_info(us, 1))
    assert accepted == [] and "VL Whole Slide Microscopy" in why


@pytest.mark.slow
def test_wsm_series_goes_through_the_pipeline_to_sr_attention_map_and_worklist(
        slide_pkg, slide_series, tmp_path: Path) -> None:
    import highdicom as hd

    from meddx.dicom.codes import C
    from meddx.dicom.worklist import load_worklist

    pipe = _pipeline(tmp_path, [slide_pkg])
    study_uid = str(slide_series[0].StudyInstanceUID)
    receive(pipe.store, slide_series, now=100.0)
    assert pipe.process_ready(now=110.0) == [pipe.store.study_key(study_uid)]
    counts = pipe.store.counts()
    assert counts["analysed"] == 2 and counts["failed"] == 0, pipe.store.failures()
    (analysis,) = pipe.store.analyses()
    assert analysis["state"] == "queued" and len(analysis["result_uids"]) == 2  # SR + map
    # the slide answer equals the model's own answer on the slide read from the same instances
    pred = analysis["prediction"]
    assert set(pred["probabilities"]) == {"normal", "tumour"}
    assert pred["notes"]["n_tiles"] > 20
    folder = tmp_path / "as-files"
    folder.mkdir()
    for ds in slide_series:
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    (direct,) = pipe.models[0].predictor.predict(folder)
    assert pred["probabilities"] == pytest.approx(direct.probabilities, abs=1e-5)
    items = {i.sop_instance_uid: i for i in pipe.outbox.pending()}
    assert set(items) == set(analysis["result_uids"])
    datasets = [pydicom.dcmread(i.path) for i in items.values()]
    (sr,) = [d for d in datasets if d.Modality == "SR"]
    (sc,) = [d for d in datasets if d.Modality != "SR"]
    # the SR: slide-level finding referencing the slide's instances, in the source study
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    report = hd.sr.srread(path)
    (main,) = [g for g in report.content.get_image_measurement_groups()
               if g.finding_category.value == C.SLIDE_RESULT.value]
    refs = {(r.referenced_sop_class_uid, r.referenced_sop_instance_uid)
            for r in main.source_images}
    assert refs == {(VL_WSM, str(d.SOPInstanceUID)) for d in slide_series}
    assert sr.StudyInstanceUID == study_uid and sr.PatientID == slide_series[0].PatientID
    # the attention map: an RGB SC in the same study, on the smallest level, in slide
    # coordinates, and not a copy of the slide (the map is drawn on it)
    small = min(slide_series, key=lambda d: d.TotalPixelMatrixRows)
    assert sc.StudyInstanceUID == study_uid and sc.SeriesInstanceUID != sr.SeriesInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == small.SOPInstanceUID
    assert sc.ContainerIdentifier == small.ContainerIdentifier
    rgb = sc.pixel_array
    assert rgb.shape[:2] == (small.TotalPixelMatrixRows, small.TotalPixelMatrixColumns)
    base = hd.imread(pipe.store.work / "instances" / pipe.store.study_key(study_uid) /
                     f"{small.SOPInstanceUID}.dcm").get_total_pixel_matrix()
    changed = np.abs(rgb.astype(int) - base.astype(int)).max(axis=2) > 30
    assert 0.05 < changed.mean() < 0.95  # tissue tiles coloured, background left alone
    # the worklist ranks the study with the slide's calibrated risk
    (entry,) = load_worklist(pipe.store.path, include_uid=True)
    assert entry.study_uid == study_uid
    risk = (pred["calibrated"] or pred["probabilities"])["tumour"]
    assert entry.risk == pytest.approx(risk, abs=1e-5) and entry.models
    # the same instances again: no second SR
    receive(pipe.store, slide_series, now=200.0)
    pipe.process_ready(now=300.0)
    assert len(pipe.store.analyses()) == 1 and len(pipe.outbox.pending()) == 2
    assert list((pipe.store.work / "slides").iterdir()) == []  # the links are cleaned up


def test_blank_slide_is_listed_with_its_reason_not_crashing(slide_pkg, slide_series,
                                                           tmp_path: Path) -> None:
    """A WSM series without tissue (all frames white) cannot be tiled: every instance ends in
    the failure list with the reader's reason; no result is queued, the node goes on."""
    import copy

    pipe = _pipeline(tmp_path, [slide_pkg])
    study, series = generate_uid(), generate_uid()
    blank = []
    for ds in slide_series:
        ds = copy.deepcopy(ds)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PixelData = b"\xff" * len(ds.PixelData)
        blank.append(ds)
    receive(pipe.store, blank, now=100.0)
    pipe.process_ready(now=110.0)
    failures = pipe.store.failures()
    assert {f["sop_uid"] for f in failures} == {str(d.SOPInstanceUID) for d in blank}
    assert {f["reason"] for f in failures} == {"decode-failure"}
    assert all("tissue" in f["detail"] for f in failures), failures
    assert pipe.store.analyses() == [] and pipe.outbox.pending() == []


@pytest.mark.slow
def test_orthanc_sends_a_slide_and_gets_its_sr_and_attention_map_back(
        orthanc, slide_pkg, slide_series, tmp_path: Path) -> None:
    """End to end against Orthanc: the WSM series stored in Orthanc is sent to the meddx node
    by C-STORE; the slide SR and the attention map SC come back by C-STORE into the same study,
    found by QIDO-RS and read back by WADO-RS."""
    import time

    import highdicom as hd

    from meddx.dicom.listener import Listener, ListenerConfig
    from meddx.dicom.send import Destination, Outbox
    from meddx.dicom.watch import make_client

    orthanc.clear()
    store = Store(tmp_path / "work")
    dest = Destination(kind="dimse", host="127.0.0.1", port=orthanc.dicom_port,
                       ae_title=orthanc.ae_title)
    pipe = Pipeline(store, [load_model(slide_pkg.path)], Outbox(store.work / "outbox.sqlite"),
                    dest, quiet=1.0)
    listener = Listener(store, ListenerConfig(port=0, host="127.0.0.1",
                                              allow={orthanc.ae_title: "127.0.0.1"}))
    listener.start()
    try:
        orthanc.add_modality("meddx", "MEDDX", listener.port)
        study = None
        for i, ds in enumerate(slide_series):
            path = tmp_path / f"{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            study = orthanc.upload(path)["ParentStudy"]
        orthanc.rest("/modalities/meddx/store", json=[study])  # Orthanc → C-STORE → meddx
        assert store.counts()["received"] == len(slide_series)
        pipe.process_ready(now=time.time() + 60)
        report = pipe.outbox.deliver()
        assert not report.failed and not report.deferred, report.errors
    finally:
        listener.stop()
    study_uid = str(slide_series[0].StudyInstanceUID)
    client = make_client(orthanc.dicomweb_url)
    ours = [ds for s in client.search_for_series(study_instance_uid=study_uid)
            for ds in client.iter_series(study_uid, s["0020000E"]["Value"][0])
            if ds.get("Manufacturer") == "meddx"]
    (sr,) = [ds for ds in ours if ds.Modality == "SR"]
    (sc,) = [ds for ds in ours if ds.Modality != "SR"]
    report_sr = hd.sr.ComprehensiveSR.from_dataset(sr)
    assert report_sr.PatientID == slide_series[0].PatientID
    referenced = {str(r.ReferencedSOPInstanceUID)
                  for item in sr.CurrentRequestedProcedureEvidenceSequence
                  for s in item.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
    assert referenced == {str(d.SOPInstanceUID) for d in slide_series}
    assert sc.PhotometricInterpretation == "RGB" and sc.StudyInstanceUID == study_uid
    assert sc.ContainerIdentifier == slide_series[0].ContainerIdentifier
