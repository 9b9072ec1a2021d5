"""The hand-staged labelled tile set (CRCHistoPhenotypes) and the mosaic slide builder.

Staging runs here on a small stand-in made in the test (same file layout and MATLAB files as the
real snapshot); the real staged copy is optional benchmark data: its test skips when it is
absent, in CI too (``optional: true`` in the catalog).
"""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from meddx.catalog import get_entry, is_available, resolve
from meddx.errors import ConfigError, DataError
from meddx.modalities.pathology import mosaic, tileset


def _fake_colon(folder: Path, n: int = 100, side: int = 128) -> Path:
    """``n`` images as in the snapshot: odd ids positive (two centres), even ids negative."""
    colon = folder / "Data" / "ColonCancer"
    colon.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, n + 1):
        positive = i % 2 == 1
        rgb = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(colon / f"img{i}{'_epithelial' if positive else ''}.bmp")
        # MATLAB 1-based (x, y): (10, 20) lies in tile row 0 col 0 at 64 px; (100, 70) in r1 c1
        pts = np.array([[10.0, 20.0], [100.0, 70.0]]) if positive else np.zeros((0, 2), np.uint8)
        savemat(colon / f"img{i}_epithelial.mat", {"detection": pts})
    return folder


@pytest.fixture()
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDDX_DATA", str(tmp_path / "nodata"))
    monkeypatch.setenv("MEDDX_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_catalog_names_source_licence_and_how_to_stage() -> None:
    e = get_entry("crchistophenotypes")
    assert e.optional and e.modality == "pathology" and e.task.positive_class == "epithelial"
    assert "Sirinukunwattana" in e.citation and "Ilse" in e.citation
    assert "mgwoozdz/Neural-Trees-for-Multiple-Instance-Learning" in e.description
    assert "unconfirmed" in e.license
    assert all(len(v["sha256"]) == 64 for v in e.files.values())
    assert e.stage.startswith("meddx wsi stage crchistophenotypes")


def test_absent_set_is_a_data_error_that_says_how_to_stage_it(isolated) -> None:
    assert not is_available("crchistophenotypes")
    with pytest.raises(DataError) as info:
        tileset.locate()
    text = str(info.value)
    assert "not available offline" in text and "meddx wsi stage crchistophenotypes" in text
    assert str(isolated / "nodata") in text


def test_stage_writes_labels_and_checksums_then_resolves(isolated) -> None:
    root = tileset.stage(_fake_colon(isolated / "snap"))
    assert root == isolated / "cache" / "data" / "pathology" / "crchistophenotypes"
    assert tileset.verify(root) == 201  # 100 images, 100 centre files, images.csv
    rows = list(csv.DictReader((root / "images.csv").open()))
    assert {r["image"]: (r["label"], r["n_epithelial"]) for r in rows}["img7"] == (
        "epithelial", "2")
    assert {r["image"]: r["label"] for r in rows}["img8"] == "no_epithelial"
    assert resolve("crchistophenotypes")[0] == root / "SHA256SUMS"
    with pytest.raises(DataError, match="catalog's SHA-256"):  # a stand-in, not the real copy
        tileset.locate()
    recs = tileset.read_images(root)
    assert recs[0].centres.tolist() in ([], [[9.0, 19.0], [99.0, 69.0]])  # 0-based now


def test_stage_from_a_git_snapshot(isolated) -> None:
    src = _fake_colon(isolated / "repo", n=100, side=16)
    subprocess.run(["git", "init", "-q", str(src)], check=True)
    subprocess.run(["git", "-C", str(src), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(src), "-c", "user.name=t", "-c", "user.email=t@t",
                    "commit", "-qm", "data"], check=True)
    root = tileset.stage(src / ".git", isolated / "out")
    assert len(list((root / "images").iterdir())) == 100


def test_tampered_or_mislabelled_copies_are_refused(isolated) -> None:
    root = tileset.stage(_fake_colon(isolated / "snap"), isolated / "staged")
    (root / "images" / "img2.bmp").write_bytes(b"changed")
    with pytest.raises(DataError, match="differs from SHA256SUMS"):
        tileset.verify(root)
    colon = isolated / "snap" / "Data" / "ColonCancer"
    (colon / "img3_epithelial.bmp").rename(colon / "img3.bmp")  # positive centres, negative name
    with pytest.raises(DataError, match="disagree on the label"):
        tileset.stage(isolated / "snap", isolated / "again")
    (colon / "img3.bmp").unlink()
    with pytest.raises(DataError, match="expected 100 images, found 99"):
        tileset.stage(isolated / "snap", isolated / "again")


def test_tile_labels_mark_the_tiles_holding_a_centre() -> None:
    centres = np.array([[5.0, 3.0], [70.0, 130.0], [300.0, 5.0]])  # (x, y); the last is outside
    grid = tileset.tile_labels(centres, (192, 128), 64)
    assert grid.shape == (3, 2)
    assert grid.tolist() == [[1, 0], [0, 0], [0, 1]]
    assert tileset.tile_labels(np.zeros((0, 2)), (128, 128), 64).sum() == 0


def test_build_tiles_splits_by_image_with_right_labels(isolated) -> None:
    root = tileset.stage(_fake_colon(isolated / "snap"), isolated / "staged")
    tiles_csv = tileset.build_tiles(root, isolated / "tiles", tile=64)
    rows = list(csv.DictReader(tiles_csv.open()))
    assert len(rows) == 100 * 4
    by_image: dict[str, set[str]] = {}
    for r in rows:
        by_image.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_image.values())
    img7 = {(r["row"], r["col"]): r["label"] for r in rows if r["patient_id"] == "img7"}
    assert img7 == {("0", "0"): "epithelial", ("0", "1"): "other", ("1", "0"): "other",
                    ("1", "1"): "epithelial"}
    assert all(r["label"] == "other" for r in rows if r["patient_id"] == "img8")
    splits = tileset.split_images(tileset.read_images(root), 0)
    assert splits == tileset.split_images(tileset.read_images(root), 0)
    assert sorted(splits.values()).count("test") == 20
    with pytest.raises(ConfigError):
        tileset.split_images([], 0, (0.5, 0.6))


def _pool(n_pos: int = 5, n_neg: int = 40) -> list[tuple[str, str]]:
    return [(f"p{i}", "epithelial") for i in range(n_pos)] + [
        (f"n{i}", "other") for i in range(n_neg)]


def test_mosaics_are_deterministic_and_labelled_by_their_tiles() -> None:
    pool = _pool()
    a = mosaic.plan_mosaics(pool, 20, grid=3, positive="epithelial", max_positive=2, seed=1)
    b = mosaic.plan_mosaics(list(reversed(pool)), 20, grid=3, positive="epithelial",
                            max_positive=2, seed=1)
    assert a == b
    assert a != mosaic.plan_mosaics(pool, 20, grid=3, positive="epithelial", max_positive=2,
                                    seed=2)
    labels = dict(pool)
    for m in a:
        n_pos = sum(labels[t] == "epithelial" for t in m.tiles)
        assert len(m.tiles) == 9 and len(set(m.tiles)) == 9 and n_pos == m.positives
        assert m.label == ("positive" if n_pos else "negative") and n_pos <= 2
    assert [m.label for m in a].count("positive") == 10


def test_mosaics_draw_only_from_the_given_pool_and_refuse_bad_plans() -> None:
    test_pool = [(t, y) for t, y in _pool() if t not in ("p0", "n0")]
    plan = mosaic.plan_mosaics(test_pool, 10, grid=2, positive="epithelial")
    assert not {"p0", "n0"} & {t for m in plan for t in m.tiles}
    with pytest.raises(DataError, match="no tile labelled"):
        mosaic.plan_mosaics(_pool(0), 2, grid=2, positive="epithelial")
    with pytest.raises(DataError, match="cannot fill"):
        mosaic.plan_mosaics(_pool(1, 3), 2, grid=2, positive="epithelial")
    with pytest.raises(ConfigError):
        mosaic.plan_mosaics(_pool(), 2, grid=2, positive="epithelial", max_positive=5)


def test_written_mosaics_open_as_slides_with_the_tiles_in_place(tmp_path) -> None:
    from meddx.modalities.pathology.slide import open_slide

    colours = {f"t{i}": np.full((32, 32, 3), 20 * i, np.uint8) for i in range(6)}
    pool = [("t0", "epithelial")] + [(f"t{i}", "other") for i in range(1, 6)]
    plan = mosaic.plan_mosaics(pool, 2, grid=2, positive="epithelial", seed=0)
    rows = mosaic.write_mosaics(plan, tmp_path, colours.__getitem__, mpp=0.55, split="test")
    assert rows == ["m000.tiff,negative,test", "m001.tiff,positive,test"]
    with open_slide(tmp_path / "m001.tiff") as s:
        assert s.dimensions == (64, 64) and abs(s.mpp - 0.55) < 1e-6
        px = s.read_region((0, 0), 0, (64, 64))
    assert px[40, 8, 0] == colours[plan[1].tiles[2]][0, 0, 0]  # row 1, col 0
    with pytest.raises(DataError, match="differ in size"):
        mosaic.compose(plan[0], lambda t: np.zeros((8 if t == plan[0].tiles[0] else 9, 9, 3)))


def test_real_staged_copy_matches_the_catalog() -> None:
    if not is_available("crchistophenotypes"):
        pytest.skip("optional benchmark data: run `meddx wsi stage crchistophenotypes SNAPSHOT`")
    root = tileset.locate()  # catalog SHA-256s and all 201 files
    recs = tileset.read_images(root)
    assert len(recs) == 100 and sum(r.label == "epithelial" for r in recs) == 51
    assert sum(len(r.centres) for r in recs) == 7722  # the published epithelial count
