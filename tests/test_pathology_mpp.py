"""A TIFF's screen/print resolution default is no microscope resolution, and tiles far finer
than the scan are refused unless asked for (issue 23, point 19)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from meddx.cli import app
from meddx.errors import DataError, InputMismatchError
from meddx.modalities.pathology.slide import open_slide
from meddx.modalities.pathology.tiling import tile_index
from pathology_support import synthetic_tissue, write_pyramid

runner = CliRunner()


@pytest.fixture
def dpi72(tmp_path):
    """An ordinary pyramidal TIFF as image tools write it: 72 dpi on every page."""
    return write_pyramid(tmp_path / "boxes.tif", synthetic_tissue((256, 384)), dpi=72)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_a_72_dpi_tag_is_no_resolution(dpi72, backend):
    with pytest.raises(DataError, match="72 dpi, a screen or print default") as e:
        open_slide(dpi72, backend=backend)  # (it reads as 352.8 µm/px)
    assert "--slide-mpp" in e.value.hint
    with open_slide(dpi72, mpp=0.5, backend=backend) as s:
        assert s.mpp == 0.5


@pytest.mark.parametrize(("dpi", "kept"), [(96, None), (300, None), (101600, 0.25)])
def test_common_dpi_are_ignored_a_scanner_resolution_in_inches_is_kept(tmp_path, dpi, kept):
    path = write_pyramid(tmp_path / "s.tif", synthetic_tissue((128, 128)), dpi=dpi, levels=1)
    if kept is None:
        with pytest.raises(DataError, match="screen or print default"):
            open_slide(path)
    else:
        with open_slide(path) as s:
            assert s.mpp == pytest.approx(kept)


def test_implausibly_coarse_resolution_in_centimetres_is_no_resolution(tmp_path):
    path = write_pyramid(tmp_path / "s.tif", synthetic_tissue((128, 128)), mpp=50.0, levels=1)
    with pytest.raises(DataError, match="coarser than any microscope scan"):
        open_slide(path)


def test_tiles_far_finer_than_the_scan_are_refused_unless_allowed(tmp_path):
    path = write_pyramid(tmp_path / "s.tif", synthetic_tissue((256, 384)), mpp=2.0)
    with open_slide(path) as s:
        with pytest.raises(InputMismatchError, match="4 times finer than the slide's scan") as e:
            tile_index(s, mpp=0.5, size=64)
        assert "--allow-upsample" in e.value.hint
        assert len(tile_index(s, mpp=0.5, size=64, min_tissue=0.0, allow_upsample=True))
        assert len(tile_index(s, mpp=1.0, size=32, min_tissue=0.0))  # 2 times: allowed


def test_cli_info_asks_for_slide_mpp_and_tiles_refuse_upsampling(dpi72, tmp_path):
    r = runner.invoke(app, ["wsi", "info", str(dpi72)])
    assert r.exit_code != 0 and isinstance(r.exception, DataError)
    assert "--slide-mpp" in r.exception.hint and "352" not in r.stdout
    out = tmp_path / "tiles"
    args = ["wsi", "tiles", str(dpi72), "--slide-mpp", "2", "--mpp", "0.5", "--size", "32",
            "--out", str(out)]
    r = runner.invoke(app, args)
    assert isinstance(r.exception, InputMismatchError) and not out.exists()
    r = runner.invoke(app, [*args, "--allow-upsample"])
    assert r.exit_code == 0, r.output
    assert (out / "boxes.tiles.csv").is_file()
