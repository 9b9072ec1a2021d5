"""`meddx wsi` as users run it (a real subprocess), on the bundled slide and synthetic ones."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import require_data
from meddx.modalities.pathology.tiling import TileIndex
from pathology_support import synthetic_tissue, write_pyramid

MEDDX = [str(Path(sys.executable).parent / "meddx")]


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*MEDDX, *args], capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.slow
def test_tiles_on_the_bundled_slide_end_to_end(tmp_path) -> None:
    import openslide

    slide = require_data("pathology/CMU-1-Small-Region.svs")
    out = tmp_path / "cmu1"
    proc = run("wsi", "tiles", str(slide), "--mpp", "0.5", "--size", "224", "--out", str(out),
               "--png")
    count = int(re.match(r"(\d+) tiles of 224 px at 0.5 µm/px", proc.stdout).group(1))
    index = TileIndex.load(out / "CMU-1-Small-Region.tiles.csv")
    assert len(index) == count and count > 20 and index.slide_dimensions == (2220, 2967)
    tiles = sorted((out / "tiles").glob("*.png"))
    assert len(tiles) == count
    x, y = index.coords[0]
    first = np.asarray(Image.open(out / "tiles" / f"CMU-1-Small-Region_x{x}_y{y}.png"))
    assert first.shape == (224, 224, 3)
    # the thumbnail has the mask outline drawn in green
    thumb = np.asarray(Image.open(out / "CMU-1-Small-Region.thumbnail.png").convert("RGB"))
    assert max(thumb.shape) == 1024 and ((thumb == (0, 200, 0)).all(axis=-1)).sum() > 500
    # nothing else is written: never the label or the macro (they may show patient identifiers)
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert written == {"CMU-1-Small-Region.tiles.csv", "CMU-1-Small-Region.thumbnail.png",
                       *(f"tiles/{p.name}" for p in tiles)}
    with openslide.OpenSlide(str(slide)) as s:
        label_size = s.associated_images["label"].size
        macro_size = s.associated_images["macro"].size
    for p in out.rglob("*.png"):
        assert Image.open(p).size not in (label_size, macro_size)


def test_info_names_associated_images_only() -> None:
    slide = require_data("pathology/CMU-1-Small-Region.svs")
    out = run("wsi", "info", str(slide)).stdout
    assert "0.499 µm/px" in out and "label, macro" in out and "never exported" in out


@pytest.mark.slow
def test_missing_mpp_and_corrupt_slides_exit_2_with_the_reason(tmp_path) -> None:
    nompp = write_pyramid(tmp_path / "nompp.tif", synthetic_tissue((256, 256)), mpp=None)
    proc = run("wsi", "tiles", str(nompp), "--out", str(tmp_path / "o"), ok=False)
    assert proc.returncode == 2 and "--slide-mpp" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("wsi", "tiles", str(nompp), "--slide-mpp", "0.5", "--size", "64",
               "--out", str(tmp_path / "o"))
    assert proc.stdout.startswith("6 tiles of 64 px")  # tissue x 128-256, y 64-256
    corrupt = tmp_path / "broken.svs"
    corrupt.write_bytes(b"not a slide at all" * 100)
    proc = run("wsi", "tiles", str(corrupt), ok=False)
    assert proc.returncode == 2 and "cannot read the slide" in proc.stderr
    assert "broken.svs" in proc.stderr and "Traceback" not in proc.stderr


def test_help_has_an_example() -> None:
    out = run("wsi", "tiles", "--help").stdout
    assert "--slide-mpp" in out and "--min-tissue" in out and "Example" in out
