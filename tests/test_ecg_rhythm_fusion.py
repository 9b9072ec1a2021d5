"""An ECG package fused with the records' own rhythm features (``rhythm_features: true``):
fitted on calib, computed again from each input at prediction, never asked of the caller."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from conftest import require_data
from meddx.modalities.ecg.rhythm import columns
from meddx.sideinputs import SideInputFusion


@pytest.fixture(scope="module")
def fused(tmp_path_factory: pytest.TempPathFactory):
    from meddx.training import train

    require_data("ecg/physionet2017")
    cfg = {"name": "ecg-rhythm", "seed": 0,
           "data": {"dataset": "physionet2017", "limit": 150, "calib_fraction": 0.3,
                    "options": {"rhythm_features": True}},
           "model": {"name": "resnet1d", "options": {"layers": [1, 1, 1, 1],
                                                     "widths": [8, 8, 8, 8]}},
           "train": {"epochs": 1, "batch_size": 32, "early_stopping_patience": None,
                     "threads": 1}}
    return train(cfg, out=tmp_path_factory.mktemp("rhythm") / "run", progress=False)


def _records(label: str, n: int) -> list[Path]:
    folder = require_data("ecg/physionet2017")
    with (folder / "REFERENCE.csv").open() as f:
        return [folder / f"{r[0]}.hea" for r in csv.reader(f) if r[1] == label][-n:]


def test_the_card_carries_the_fusion_and_asks_nothing_of_the_caller(fused):
    fusion = fused.card.side_inputs
    assert fusion is not None and fusion.derived == columns()
    assert fusion.inputs == [] and fusion.expects() == []
    # 4 network logits, then the 4 class log-probabilities of the boosted model of the rhythm
    # features (trained on the train split, stored as ONNX in the signed manifest)
    assert len(fusion.coef[0]) == 4 + 4 and np.abs(np.asarray(fusion.coef)[:, 4:]).sum() > 0
    assert fusion.derived_model in fused.manifest
    assert fusion.derived_model_info["fitted_on"] == "train"
    assert fused.card.preprocessing["derived_features"] == columns()


def test_prediction_computes_the_features_from_the_record(fused):
    """With a one-epoch network the rhythm features carry the AF decision: AF records (the
    last 6 of REFERENCE.csv) must score far above normal ones. Without features computed at
    prediction time every record would get the calib medians and the two groups would meet."""
    from meddx.inference import load_model

    predictor = load_model(fused.path)
    af = [p.probabilities["af"] for p in predictor.predict(_records("A", 6))]
    normal_preds = predictor.predict(_records("N", 6))
    normal = [p.probabilities["af"] for p in normal_preds]
    assert np.mean(af) > np.mean(normal) + 0.2, (af, normal)
    assert "derived" not in normal_preds[0].notes and "side_inputs" not in normal_preds[0].notes


def test_a_caller_cannot_send_side_inputs_to_it(fused):
    from meddx.errors import DataError
    from meddx.inference import load_model

    with pytest.raises(DataError):
        load_model(fused.path).predict(_records("N", 1), side_inputs=[{"rhythm:hr_median": 60}])


def test_missing_derived_features_take_the_calib_median():
    fusion = SideInputFusion(inputs=[], image_features=["logit:a", "logit:b"],
                             coef=[[1.0, 0.0, 2.0], [0.0, 1.0, -2.0]], intercept=[0.0, 0.0],
                             derived=["rhythm:rr_cv"], derived_fill=[0.1],
                             derived_mean=[0.1], derived_std=[0.05])
    z = np.array([[0.5, 0.2], [0.5, 0.2]])
    absent = fusion.fuse(z, [{}, {}], None)
    nan = fusion.fuse(z, [{}, {}], np.array([[np.nan], [np.nan]]))
    np.testing.assert_allclose(absent, nan)
    np.testing.assert_allclose(absent, z, atol=1e-6)  # the median standardises to 0
    irregular = fusion.fuse(z, [{}, {}], np.array([[0.3], [0.1]]))
    # (0.3 - 0.1) / 0.05 = 4 standard deviations: +8 on a, -8 on b
    assert irregular[0, 0] - irregular[0, 1] == pytest.approx(0.3 + 16.0, abs=1e-4)


def test_cds_discovery_asks_for_no_patient(fused):
    """The rhythm features come from the ECG itself: the CDS service prefetches the ECG
    Observations only, not the Patient an age/sex model needs."""
    from meddx.modalities import get_modality
    from meddx.serving.cds import adapter_for, service_prefetch

    get_modality("ecg")  # registers its CDS adapter
    templates = service_prefetch(adapter_for("ecg"), fused.card, "patient-view")
    assert "patient" not in templates and templates


def test_external_validation_reads_the_features_with_the_records(fused, tmp_path):
    """`meddx validate MODEL labels.csv` reads record by record; the features travel with each
    record into the external split (else the fusion would see only calib medians)."""
    from meddx.evaluation.external import SPLIT, external_bundle

    rows = [(p, "A") for p in _records("A", 3)] + [(p, "N") for p in _records("N", 3)]
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,label\n" + "".join(f"{p},{y}\n" for p, y in rows))
    ext = external_bundle(fused, csv_path).splits[SPLIT]
    assert list(ext.metadata.columns) == columns() and len(ext.metadata) == 6
    assert ext.metadata["rhythm:irregular_frac"].iloc[:3].mean() > \
        ext.metadata["rhythm:irregular_frac"].iloc[3:].mean()


def test_a_split_is_scored_on_the_whole_record_as_a_prediction_is(fused):
    """Calibration, operating points, conformal sets, evaluation and the fusion are fitted on
    `predict_split`; it must give the logits a prediction gives (the mean over the record's
    30-s windows), not the centre window's — a 60-s record tells them apart."""
    from meddx.inference import load_model
    from meddx.modalities.base import Split

    predictor = load_model(fused.path)
    paths = [p for p in _records("A", 40) if predictor.read(p).tensor.shape[0] >= 3][:2]
    assert paths, "no AF record of 45 s or more among the last 40"
    samples = [predictor.read(p) for p in paths]
    split = Split(name="x", inputs=[s.meta["signal"] for s in samples],
                  targets=np.zeros(len(samples), dtype=int), ids=[s.id for s in samples])
    z_split, _ = predictor.predict_split(split, fused=False)
    z_pred, _ = predictor._sample_logits(samples, batch_size=8)
    np.testing.assert_allclose(z_split, z_pred, rtol=1e-4, atol=1e-4)
