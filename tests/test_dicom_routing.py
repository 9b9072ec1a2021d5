"""Routing: which model runs on which series, and why not."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset

from meddx.dicom.routing import (
    ModelSlot,
    Route,
    RoutingConfig,
    Selection,
    choose,
    load_routing,
    series_info,
)
from meddx.errors import ConfigError

US = "1.2.840.10008.5.1.4.1.1.6.1"


def _header(**kw: object) -> Dataset:
    ds = Dataset()
    ds.Modality, ds.SOPClassUID, ds.PhotometricInterpretation = "US", US, "MONOCHROME2"
    ds.Rows = ds.Columns = 28
    ds.BodyPartExamined, ds.SeriesDescription = "BREAST", "Breast US left"
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def _slot(name: str = "breast", dims: int = 2, channels: int = 1, **select: object) -> ModelSlot:
    return ModelSlot(name=name, spatial_dims=dims, channels=channels,
                     route=Route(model=name, select=Selection(**select)))


def test_rules_select_by_attributes() -> None:
    slot = _slot(modality=("US",), sop_class=(US,), body_part=("breast",),
                 photometric=("MONOCHROME2",), min_size=16, series_description="(?i)breast")
    accepted, _ = choose([slot], series_info(_header(), 1))
    assert accepted == [slot]
    for change, word in [({"Modality": "CT"}, "Modality CT"),
                         ({"BodyPartExamined": "CHEST"}, "BodyPartExamined CHEST"),
                         ({"Rows": 8}, "image size 8x28"),
                         ({"SeriesDescription": "Thyroid"}, "SeriesDescription")]:
        accepted, why = choose([slot], series_info(_header(**change), 1))
        assert accepted == [] and why.startswith("breast: ") and word in why


def test_card_input_decides_2d_3d_and_channels() -> None:
    volume_model = _slot("ct3d", dims=3)
    rgb_model = _slot("derm", channels=3)
    one_slice = series_info(_header(), 1)
    accepted, why = choose([volume_model], one_slice)
    assert accepted == [] and "3D model needs a volume" in why
    assert choose([volume_model], series_info(_header(), 40))[0] == [volume_model]
    accepted, why = choose([_slot()], series_info(_header(PhotometricInterpretation="RGB"), 1))
    assert accepted == [] and "not gray" in why
    assert choose([rgb_model], series_info(_header(PhotometricInterpretation="RGB"), 1))[0]


def test_series_without_pixels_is_an_unsupported_sop_class() -> None:
    sr = Dataset()
    sr.Modality, sr.SOPClassUID = "SR", "1.2.840.10008.5.1.4.1.1.88.22"
    accepted, why = choose([_slot()], series_info(sr, 1))
    assert accepted == [] and "unsupported SOP class" in why


def test_meddx_results_are_not_analysed_again() -> None:
    accepted, why = choose([_slot()], series_info(_header(Manufacturer="meddx"), 1))
    assert accepted == [] and "meddx result" in why


def test_routing_file(tmp_path: Path) -> None:
    p = tmp_path / "routing.yaml"
    p.write_text("routes:\n  - model: breast\n    select: {modality: [US]}\n    aggregate: mean\n")
    cfg = load_routing(p)
    assert cfg.routes[0].aggregate == "mean" and cfg.routes[0].select.modality == ("US",)

    class Card:
        name, preprocessing = "breast", {"spatial_dims": 2, "channels": 1}

    assert ModelSlot.from_card(Card(), cfg).route.aggregate == "mean"
    assert ModelSlot.from_card(Card(), RoutingConfig()).route.select == Selection()
    p.write_text("routes:\n  - model: breast\n    select: {series_description: '(['}\n")
    with pytest.raises(ConfigError, match="invalid routing file"):
        load_routing(p)
    p.write_text("routes:\n  - model: breast\n    selct: {}\n")
    with pytest.raises(ConfigError, match="invalid routing file"):
        load_routing(p)
