"""Whole-slide reading and tiling: metadata, resolution, levels, tissue, tiles, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from meddx.catalog import data_roots
from meddx.errors import ConfigError, DataError
from meddx.modalities.pathology.slide import SLIDE_MPP_FLAG, open_slide
from meddx.modalities.pathology.stain import MacenkoNormalizer, hed_jitter
from meddx.modalities.pathology.tiling import TileIndex, iter_tiles, tile_index, tissue_mask
from pathology_support import tissue_slide, write_pyramid


def _bundled_slide() -> Path:
    for root in data_roots():
        p = root / "pathology" / "CMU-1-Small-Region.svs"
        if p.is_file():
            return p
    if os.environ.get("CI") == "true":
        pytest.fail("bundled slide pathology/CMU-1-Small-Region.svs missing under CI")
    pytest.skip("bundled slide pathology/CMU-1-Small-Region.svs not found (set MEDDX_DATA)")


@pytest.fixture
def slide_file(tmp_path: Path) -> Path:
    return write_pyramid(tmp_path / "s.tif", tissue_slide(1024, 768, (256, 192, 768, 576)))


def test_metadata_levels_and_mpp_of_a_pyramid(slide_file: Path) -> None:
    with open_slide(slide_file) as s:
        assert s.dimensions == (1024, 768)
        assert s.level_dimensions == [(1024, 768), (512, 384), (256, 192)]
        assert s.level_downsamples == pytest.approx([1, 2, 4])
        assert s.mpp == pytest.approx(0.5)
        assert s.backend in ("openslide", "tiffslide")


def test_a_slide_without_resolution_needs_slide_mpp(tmp_path: Path) -> None:
    p = write_pyramid(tmp_path / "nompp.tif", tissue_slide(256, 256), mpp=None, levels=1)
    with pytest.raises(DataError) as e:
        open_slide(p)
    assert SLIDE_MPP_FLAG in str(e.value) + (e.value.hint or "")
    with open_slide(p, mpp=0.25) as s:
        assert s.mpp == 0.25


def test_corrupt_missing_and_non_slide_files_are_data_errors(tmp_path: Path,
                                                            slide_file: Path) -> None:
    broken = tmp_path / "broken.tif"
    broken.write_bytes(slide_file.read_bytes()[:3000])
    garbage = tmp_path / "notes.svs"
    garbage.write_bytes(b"not a slide at all" * 100)
    for p in (broken, garbage, tmp_path / "missing.svs"):
        with pytest.raises(DataError), open_slide(p) as s:
            s.read_region((0, 0), 0, (64, 64))


def test_read_at_mpp_reads_the_closest_finer_level_and_never_upsamples(slide_file: Path) -> None:
    with open_slide(slide_file) as s:
        assert s.best_level(2.0) == 1 and s.best_level(3.0) == 1 and s.best_level(1.5) == 0
        tile = s.read_at_mpp((256, 192), 1.0, 64)  # 2x: level 1, no resize
        assert tile.shape == (64, 64, 3) and tile.dtype == np.uint8
        direct = s.read_region((256, 192), 1, (64, 64))
        assert np.array_equal(tile, direct)
        assert s.read_at_mpp((0, 0), 1.5, (40, 30)).shape == (30, 40, 3)
        with pytest.raises(ConfigError, match="upsampled"):
            s.read_at_mpp((0, 0), 0.25, 32)


def test_tissue_mask_and_tiles_find_the_tissue_box(slide_file: Path) -> None:
    with open_slide(slide_file) as s:
        mask, ds = tissue_mask(s, max_side=256)
        assert mask.shape == (192, 256) and ds == pytest.approx(4)
        assert 0.2 < mask.mean() < 0.3  # the box is a quarter of the slide
        index = tile_index(s, mpp=1.0, size=64, min_tissue=0.9)
        assert index.level0_size == 128
        x, y = index.coords[:, 0], index.coords[:, 1]
        # the 512x384 box on a 128-px grid: x 256..640 (4 tiles), y 256 and 384 (2 tiles)
        assert len(index) == 4 * 2
        assert x.min() >= 256 and x.max() + 128 <= 768 and y.min() >= 192 and y.max() + 128 <= 576
        assert (index.tissue >= 0.9).all()
        every = tile_index(s, mpp=1.0, size=64, min_tissue=0)
        assert len(every) == (1024 // 128) * (768 // 128)
        overlapping = tile_index(s, mpp=1.0, size=64, overlap=32, min_tissue=0)
        assert len(overlapping) == (1024 // 64 - 1) * (768 // 64 - 1)
        with pytest.raises(ConfigError):
            tile_index(s, mpp=1.0, size=64, overlap=64)


def test_empty_glass_has_no_tissue(tmp_path: Path) -> None:
    p = write_pyramid(tmp_path / "blank.tif", np.full((256, 256, 3), 240, np.uint8), levels=1)
    with open_slide(p) as s:
        assert len(tile_index(s, mpp=0.5, size=32)) == 0


def test_iter_tiles_streams_batches_in_index_order(slide_file: Path) -> None:
    with open_slide(slide_file) as s:
        index = tile_index(s, mpp=1.0, size=64, min_tissue=0.9)
        batches = list(iter_tiles(s, index, batch_size=5))
        assert [len(b[1]) for b in batches] == [5, 3]
        assert np.array_equal(np.concatenate([b[0] for b in batches]), index.coords)
        assert batches[0][1].shape == (5, 64, 64, 3)


def test_tile_index_round_trip(tmp_path: Path, slide_file: Path) -> None:
    with open_slide(slide_file) as s:
        index = tile_index(s, mpp=1.0, size=64, min_tissue=0.5)
    index.save(tmp_path / "t.csv")
    back = TileIndex.load(tmp_path / "t.csv")
    assert np.array_equal(back.coords, index.coords)
    assert np.allclose(back.tissue, index.tissue, atol=1e-4)
    assert (back.mpp, back.size, back.level0_size) == (1.0, 64, 128)
    with pytest.raises(DataError):
        TileIndex.load(tmp_path / "nothing.csv")


def test_macenko_maps_a_restained_tile_back_and_hed_jitter_changes_colour(
        slide_file: Path) -> None:
    with open_slide(slide_file) as s:
        ref = s.read_region((256, 192), 0, (256, 256))
    norm = MacenkoNormalizer().fit(ref)
    shifted = np.clip(ref.astype(np.int16) + np.array([-30, 20, -10]), 0, 255).astype(np.uint8)
    back = norm.transform(shifted)
    assert back.shape == ref.shape
    err_before = np.abs(shifted.astype(float).mean((0, 1)) - ref.mean((0, 1))).mean()
    err_after = np.abs(back.astype(float).mean((0, 1)) - ref.mean((0, 1))).mean()
    assert err_after < err_before
    jittered = hed_jitter(ref[None], sigma=0.1, rng=np.random.default_rng(1))[0]
    assert jittered.shape == ref.shape and not np.array_equal(jittered, ref)
    with pytest.raises(DataError):
        MacenkoNormalizer().transform(ref)


def test_the_bundled_aperio_slide() -> None:
    with open_slide(_bundled_slide()) as s:
        assert s.dimensions == (2220, 2967)
        assert s.mpp == pytest.approx(0.499, abs=1e-3)
        assert {"label", "macro"} <= set(s.associated_names)
        index = tile_index(s, mpp=0.5, size=224)
        assert 20 < len(index) < 117
        assert index.coords.min() >= 0
        assert (index.coords + index.level0_size <= np.array(s.dimensions)).all()


def test_cli_tiles_on_the_bundled_slide(tmp_path: Path) -> None:
    slide = _bundled_slide()
    out = tmp_path / "tiles"
    r = subprocess.run([sys.executable, "-m", "meddx.cli", "wsi", "tiles", str(slide),
                        "--mpp", "1.0", "--size", "128", "--out", str(out), "--png",
                        "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tiles"] > 10 and f"{summary['tiles']} tiles" in r.stdout
    assert (out / "thumbnail.png").is_file() and (out / "tiles.json").is_file()
    pngs = list((out / "tiles").glob("*.png"))
    assert len(pngs) == summary["tiles"]
    names = {p.name.lower() for p in out.rglob("*")}
    assert not any("label" in n or "macro" in n for n in names)


def test_cli_errors_are_clear(tmp_path: Path) -> None:
    p = write_pyramid(tmp_path / "nompp.tif", tissue_slide(256, 256), mpp=None, levels=1)
    r = subprocess.run([sys.executable, "-m", "meddx.cli", "wsi", "tiles", str(p), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--slide-mpp" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"\x00" * 5000)
    r = subprocess.run([sys.executable, "-m", "meddx.cli", "wsi", "info", str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_peak_memory_of_tiling_does_not_hold_the_level(tmp_path: Path) -> None:
    """Tiling a 6,000 x 6,000 slide (108 MB of pixels at level 0) stays far below that."""
    big = tissue_slide(6000, 6000, (1000, 1000, 5000, 5000))
    p = write_pyramid(tmp_path / "big.tif", big, levels=4, compression="zlib")
    del big
    code = ("import resource,sys\nfrom meddx.modalities.pathology.slide import open_slide\n"
            "from meddx.modalities.pathology.tiling import tile_index, iter_tiles\n"
            "base=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"s=open_slide({str(p)!r})\nidx=tile_index(s, mpp=0.5, size=256)\n"
            "n=sum(len(b) for _, b in iter_tiles(s, idx, 16))\n"
            "print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss-base)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    n, grew_kb = map(int, r.stdout.split())
    assert n == (4000 // 256) ** 2 or n > 200
    assert grew_kb * 1024 < 60e6, f"tiling grew the process by {grew_kb / 1024:.0f} MB"
