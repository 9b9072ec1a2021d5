"""Tissue detection and streaming tiling on synthetic slides with known tissue."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from conftest import require_data
from meddx.errors import ConfigError, DataError
from meddx.modalities.pathology.slide import open_slide
from meddx.modalities.pathology.tiling import TileIndex, iter_tiles, tile_index, tissue_mask
from pathology_support import synthetic_tissue, write_pyramid

# 768x512 slide at 0.5 µm/px; tissue fills x 128-384, y 64-320 (a 4x4 block of 64 px tiles)
BOX = (128, 64, 384, 320)
INSIDE = {(x, y) for x in (128, 192, 256, 320) for y in (64, 128, 192, 256)}


@pytest.fixture()
def slide_path(tmp_path):
    return write_pyramid(tmp_path / "tissue.tif", synthetic_tissue((512, 768), BOX), mpp=0.5)


def test_tissue_mask_finds_the_tissue(slide_path) -> None:
    with open_slide(slide_path) as s:
        mask, ds = tissue_mask(s)
    # 4 µm/px mask: 8 level-0 pixels per mask pixel
    assert mask.shape == (64, 96) and ds == pytest.approx(8)
    truth = np.zeros_like(mask)
    truth[BOX[1] // 8:BOX[3] // 8, BOX[0] // 8:BOX[2] // 8] = True
    assert (mask == truth).mean() > 0.99


def test_tiles_on_the_tissue_at_level0_coordinates(slide_path) -> None:
    with open_slide(slide_path) as s:
        index = tile_index(s, mpp=0.5, size=64, min_tissue=0.5)
        coarse = tile_index(s, mpp=1.0, size=32, min_tissue=0.5)  # same area, half the pixels
    assert {tuple(c) for c in index.coords.tolist()} == INSIDE
    assert index.coords.dtype == np.int64 and index.level0_size == 64
    assert index.tissue.dtype == np.float32 and (index.tissue > 0.95).all()
    assert {tuple(c) for c in coarse.coords.tolist()} == INSIDE and coarse.level0_size == 64


def test_min_tissue_zero_keeps_the_whole_grid_and_high_keeps_full_tiles(slide_path) -> None:
    with open_slide(slide_path) as s:
        everything = tile_index(s, mpp=0.5, size=64, min_tissue=0.0)
        full = tile_index(s, mpp=0.5, size=64, min_tissue=0.95)
        shifted = tile_index(s, mpp=0.5, size=96, min_tissue=0.5)
    assert len(everything) == 12 * 8
    assert {tuple(c) for c in full.coords.tolist()} == INSIDE
    # 96 px tiles straddle the box edges: kept only where at least half is tissue
    for (x, y), t in zip(shifted.coords.tolist(), shifted.tissue.tolist(), strict=True):
        inter = max(0, min(x + 96, BOX[2]) - max(x, BOX[0])) * max(0, min(y + 96, BOX[3])
                                                                   - max(y, BOX[1]))
        assert abs(t - inter / 96**2) < 0.1 and t >= 0.5


def test_overlap_steps_by_size_minus_overlap(slide_path) -> None:
    with open_slide(slide_path) as s:
        index = tile_index(s, mpp=0.5, size=64, overlap=32, min_tissue=0.9)
    xs, ys = sorted(set(index.coords[:, 0].tolist())), sorted(set(index.coords[:, 1].tolist()))
    assert xs == list(range(128, 321, 32)) and ys == list(range(64, 257, 32))
    assert len(index) == 49 and index.overlap == 32


@pytest.mark.parametrize("kwargs", [{"size": 0}, {"overlap": 64}, {"overlap": -1},
                                    {"min_tissue": 1.5}, {"mpp": 0.0}])
def test_bad_tiling_parameters_are_config_errors(slide_path, kwargs) -> None:
    with open_slide(slide_path) as s, pytest.raises(ConfigError):
        tile_index(s, **{"size": 64, **kwargs})


def test_tile_index_round_trip(slide_path, tmp_path) -> None:
    with open_slide(slide_path) as s:
        index = tile_index(s, mpp=0.5, size=64, overlap=16, min_tissue=0.3)
    index.save(tmp_path / "t.csv")
    back = TileIndex.load(tmp_path / "t.csv")
    np.testing.assert_array_equal(back.coords, index.coords)
    np.testing.assert_allclose(back.tissue, index.tissue, atol=1e-4)
    assert (back.mpp, back.size, back.overlap, back.level0_size, back.slide_dimensions) == \
        (0.5, 64, 16, 64, (768, 512))
    (tmp_path / "bad.csv").write_text("x,y\n1,2\n")
    with pytest.raises(DataError, match="not a meddx tile index"):
        TileIndex.load(tmp_path / "bad.csv")


def test_iter_tiles_streams_batches_of_tiles(slide_path, monkeypatch) -> None:
    with open_slide(slide_path) as s:
        index = tile_index(s, mpp=0.5, size=64)
        sizes: list[tuple[int, int]] = []
        original = s._reader.read
        monkeypatch.setattr(s._reader, "read",
                            lambda xy, lvl, size: sizes.append(size) or original(xy, lvl, size))
        batches = iter_tiles(s, index, batch_size=5)
        coords, tiles = next(batches)
        assert len(sizes) == 5  # lazily: one batch read, not the index
        rest = list(batches)
        expected = s.read_region(tuple(coords[2]), 0, (64, 64))
    assert tiles.shape == (5, 64, 64, 3) and tiles.dtype == np.uint8
    np.testing.assert_array_equal(tiles[2], expected)
    assert [len(c) for c, _ in rest] == [5, 5, 1]
    assert all(size == (64, 64) for size in sizes)  # never more than a tile per read


def test_iter_tiles_memory_is_a_batch_not_the_level(tmp_path) -> None:
    # a 2048x2048 level is 12 MB of RGB; a batch of 8 tiles of 64 px is 98 kB. All tissue, no
    # glass: every tile is kept (Otsu alone would split the tissue in two)
    rgb = np.tile(synthetic_tissue((256, 256), (0, 0, 256, 256)), (8, 8, 1))
    path = write_pyramid(tmp_path / "big.tif", rgb, levels=4, tile=128)
    del rgb
    with open_slide(path, backend="tiffslide") as s:
        index = tile_index(s, mpp=0.5, size=64, min_tissue=0.5)
        assert len(index) == 32 * 32
        tracemalloc.start()
        n = sum(len(c) for c, _ in iter_tiles(s, index, batch_size=8))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert n == 1024
    assert peak < 2048 * 2048 * 3 / 8, f"peak {peak / 1e6:.1f} MB"


def test_index_of_another_slide_is_refused(slide_path, tmp_path) -> None:
    other = write_pyramid(tmp_path / "o.tif", synthetic_tissue((256, 256)), mpp=0.5)
    with open_slide(slide_path) as s:
        index = tile_index(s, mpp=0.5, size=64)
    with open_slide(other) as o, pytest.raises(ConfigError, match="tile index"):
        next(iter_tiles(o, index))


def test_bundled_slide_tiles_lie_on_tissue() -> None:
    with open_slide(require_data("pathology/CMU-1-Small-Region.svs")) as s:
        mask, ds = tissue_mask(s)
        index = tile_index(s, mpp=0.5, size=224, min_tissue=0.5)
    assert 0.2 < mask.mean() < 0.6  # a strip of skin on glass
    assert 20 <= len(index) <= 80 and (index.tissue >= 0.5).all()
    assert (index.coords >= 0).all() and (index.coords[:, 0] + 224 <= 2220).all()
    assert (index.coords[:, 1] + 224 <= 2967).all()
