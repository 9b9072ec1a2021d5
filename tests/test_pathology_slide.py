"""Reading whole-slide images: levels, resolution, regions at a resolution, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import require_data
from meddx.errors import ConfigError, DataError
from meddx.modalities.pathology import slide as slide_module
from meddx.modalities.pathology.slide import open_slide
from pathology_support import synthetic_tissue, truncate, write_pyramid

CMU1 = "pathology/CMU-1-Small-Region.svs"


@pytest.fixture()
def rgb() -> np.ndarray:
    return synthetic_tissue((256, 384), box=(64, 64, 256, 192))


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_levels_downsamples_and_mpp_from_the_file(tmp_path, rgb, backend) -> None:
    path = write_pyramid(tmp_path / "s.tif", rgb, mpp=0.25, levels=3)
    with open_slide(path, backend=backend) as s:
        assert s.backend == backend
        assert s.dimensions == (384, 256)
        assert s.level_dimensions == [(384, 256), (192, 128), (96, 64)]
        assert s.level_downsamples == pytest.approx([1, 2, 4])
        assert s.mpp == pytest.approx(0.25)
        # lossless file: the pixels come back exactly, at level 0 and inside a coarser level
        np.testing.assert_array_equal(s.read_region((10, 20), 0, (50, 30)), rgb[20:50, 10:60])
        region = s.read_region((40, 40), 1, (8, 8))
        assert region.shape == (8, 8, 3) and region.dtype == np.uint8


def test_default_backend_is_openslide_and_subifd_pyramids_read_through_tiffslide(tmp_path,
                                                                                  rgb) -> None:
    with open_slide(write_pyramid(tmp_path / "a.tif", rgb)) as s:
        assert s.backend == "openslide"
    with open_slide(write_pyramid(tmp_path / "b.tif", rgb, subifds=True), backend="tiffslide") as s:
        assert len(s.level_dimensions) == 3


def test_outside_the_slide_is_white_glass(tmp_path, rgb) -> None:
    with open_slide(write_pyramid(tmp_path / "s.tif", rgb)) as s:
        region = s.read_region((370, -5), 0, (30, 10))
    assert (region[:5] == 255).all() and (region[:, 14:] == 255).all()
    np.testing.assert_array_equal(region[5:, :14], rgb[0:5, 370:384])


def test_missing_mpp_is_an_error_naming_the_flag_unless_given(tmp_path, rgb) -> None:
    path = write_pyramid(tmp_path / "nompp.tif", rgb, mpp=None)
    for backend in ("openslide", "tiffslide"):
        with pytest.raises(DataError, match="--slide-mpp") as info:
            open_slide(path, backend=backend)
        assert "no resolution" in str(info.value) and "nompp.tif" in str(info.value)
    with open_slide(path, mpp=0.5) as s:
        assert s.mpp == 0.5
    with pytest.raises(ConfigError):
        open_slide(path, mpp=-1)


def test_given_mpp_overrides_the_file(tmp_path, rgb) -> None:
    with open_slide(write_pyramid(tmp_path / "s.tif", rgb, mpp=0.25), mpp=0.5) as s:
        assert s.mpp == 0.5


def test_corrupt_truncated_and_missing_files_are_data_errors(tmp_path, rgb) -> None:
    garbage = tmp_path / "garbage.svs"
    garbage.write_bytes(b"II*\x00" + bytes(range(256)) * 40)
    with pytest.raises(DataError, match="cannot read the slide") as info:
        open_slide(garbage)
    assert "garbage.svs" in str(info.value) and "openslide" in str(info.value)
    good = write_pyramid(tmp_path / "good.tif", synthetic_tissue((512, 512)), levels=1, tile=64)
    with pytest.raises(DataError, match="truncated.tif"):
        open_slide(truncate(good, tmp_path / "truncated.tif", 0.3))
    with pytest.raises(DataError, match="not found"):
        open_slide(tmp_path / "absent.svs")


def test_read_at_mpp_reads_the_coarsest_level_fine_enough(tmp_path, rgb, monkeypatch) -> None:
    path = write_pyramid(tmp_path / "s.tif", rgb, mpp=0.25, levels=3)
    with open_slide(path) as s:
        levels: list[int] = []
        original = s._reader.read
        monkeypatch.setattr(s._reader, "read",
                            lambda xy, lvl, size: levels.append(lvl) or original(xy, lvl, size))
        # 1.0 µm/px is level 2 exactly: no resize
        out = s.read_at_mpp((64, 32), 1.0, 16)
        np.testing.assert_array_equal(out, s.read_region((64, 32), 2, (16, 16)))
        # 0.75 µm/px: level 1 (0.5) is the coarsest at or finer; 24 level-1 px resized to 16
        levels.clear()
        out = s.read_at_mpp((64, 32), 0.75, (16, 8))
        assert levels == [1] and out.shape == (8, 16, 3)
        expected = Image.fromarray(s.read_region((64, 32), 1, (24, 12))).resize(
            (16, 8), Image.Resampling.BILINEAR)
        np.testing.assert_array_equal(out, np.asarray(expected))
        # 0.25 µm/px (the slide's own) is level 0
        assert s.best_level(1.0) == 0 and s.best_level(3.9) == 1 and s.best_level(4.02) == 2


def test_thumbnail_reads_bounded_blocks(tmp_path, monkeypatch) -> None:
    rgb = synthetic_tissue((300, 500))
    monkeypatch.setattr(slide_module, "_BLOCK", 64)
    with open_slide(write_pyramid(tmp_path / "flat.tif", rgb, levels=1)) as s:
        sizes: list[tuple[int, int]] = []
        original = s._reader.read
        monkeypatch.setattr(s._reader, "read",
                            lambda xy, lvl, size: sizes.append(size) or original(xy, lvl, size))
        thumb = s.thumbnail(100)
    assert thumb.shape == (60, 100, 3)
    assert max(max(size) for size in sizes) <= 70  # never the whole 500x300 level
    reference = np.asarray(Image.fromarray(rgb).resize((100, 60), Image.Resampling.BOX))
    assert np.abs(thumb.astype(int) - reference).mean() < 3


def test_bundled_aperio_slide(tmp_path) -> None:
    path = require_data(CMU1)
    with open_slide(path) as s:
        assert s.backend == "openslide"
        assert s.dimensions == (2220, 2967)
        assert s.mpp == pytest.approx(0.499)
        assert {"label", "macro"} <= set(s.associated_names)
        # PHI-bearing associated images are named, never readable through meddx
        assert not any(hasattr(s, name) for name in ("associated_images", "read_associated"))
        region = s.read_at_mpp((1000, 1500), 0.5, 224)
    with open_slide(path, backend="tiffslide") as t:
        assert t.mpp == pytest.approx(0.499)
        other = t.read_at_mpp((1000, 1500), 0.5, 224)
    assert region.shape == (224, 224, 3)
    # two JPEG decoders: the same pixels within rounding
    assert np.abs(region.astype(int) - other).mean() < 2
