"""End to end on tiny synthetic pyramidal TIFFs with planted labels: the slide model (ABMIL over
cached embeddings) and a tile classifier trained from a folder of patches cut from slides."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("meddx.modalities.pathology.slide", reason="slide reading (path-io) absent")

from meddx.modalities.loading import load_bundle  # noqa: E402
from pathology_model_support import slide_set  # noqa: E402

SPLITS = ["train"] * 12 + ["val"] * 4 + ["test"] * 4
TASK = {"kind": "binary", "class_names": ["normal", "tumour"], "positive_class": "tumour"}
OPTIONS = {"tile_mpp": 1.0, "tile_size": 32, "min_tissue": 0.3, "max_tiles": 64}


def _config(csv: Path, **options: object) -> dict:
    return {"name": "slides", "seed": 0, "task": TASK,
            "data": {"path": str(csv), "modality": "pathology", "calib_fraction": 0.25,
                     "options": {**OPTIONS, **options}},
            "train": {"epochs": 12, "batch_size": 4, "lr": 3e-3, "precision": "32",
                      "early_stopping_patience": None, "scheduler": "none"},
            "evaluation": {"bootstrap": 50}}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MEDDX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.slow
def test_slide_model_trains_on_cached_bags_and_evaluates(tmp_path, cache) -> None:
    from meddx.evaluation.evaluator import evaluate
    from meddx.inference import load_model
    from meddx.training import train

    csv = slide_set(tmp_path / "slides", 20, splits=SPLITS)
    bundle = load_bundle(_config(csv))
    bags = sorted((cache / "pathology").glob("*.safetensors"))
    assert len(bags) == 20  # one cached bag per slide, safetensors
    # epochs read only the cache: the slides can go away
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "slides", moved)
    package = train(_config(csv), out=tmp_path / "run", progress=False, bundle=bundle)
    shutil.move(moved, tmp_path / "slides")
    assert package.card.network["name"] == "abmil"
    assert package.card.preprocessing["encoder"]["kind"] == "stats"
    result = evaluate(package, out=tmp_path / "eval", bootstrap=50, bundle=bundle)
    assert result.metrics["auroc"]["value"] >= 0.99
    report = (tmp_path / "eval" / "report.html").read_text()
    assert "data:image/png;base64" in report or not result.errors
    # a new slide: tiles → embeddings → bag → prediction, the same as in training
    pred = load_model(package.path).predict([str(tmp_path / "slides" / "s01.tiff")])[0]
    assert pred.label == "tumour"
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 4


@pytest.mark.slow
def test_tile_classifier_from_patches_then_as_the_slide_encoder(tmp_path, cache) -> None:
    from PIL import Image

    from meddx.modalities.pathology.slide import open_slide
    from meddx.modalities.pathology.tiling import iter_tiles, tile_index
    from meddx.training import train

    csv = slide_set(tmp_path / "slides", 12, splits=(["train"] * 8 + ["val"] * 2 +
                                                       ["test"] * 2))
    patches = tmp_path / "patches"
    (patches / "img").mkdir(parents=True)
    rows = ["path,label,patient_id"]
    from pathology_model_support import slide_pixels  # noqa: F401 - same planted texture

    for i in range(12):
        slide_path = tmp_path / "slides" / f"s{i:02d}.tiff"
        with open_slide(slide_path) as slide:
            index = tile_index(slide, mpp=1.0, size=32, min_tissue=0.3)
            for xy, tiles in iter_tiles(slide, index, batch_size=64):
                for (x, y), t in zip(xy, tiles, strict=True):
                    # a patch is tumour when it holds the planted purple dots
                    label = "tumour" if (np.abs(t.astype(int) - [80, 35, 130]).sum(-1)
                                         < 60).mean() > 0.05 else "normal"
                    name = f"img/{i}_{x}_{y}.png"
                    Image.fromarray(t).save(patches / name)
                    rows.append(f"{name},{label},slide{i}")
    (patches / "labels.csv").write_text("\n".join(rows) + "\n")
    tile_cfg = {"name": "tiles", "task": TASK,
                "data": {"path": str(patches), "modality": "image", "size": 32,
                         "options": {"format": "folder"}},
                "model": {"name": "resnet18"},
                "train": {"epochs": 2, "batch_size": 64, "precision": "32",
                          "early_stopping_patience": None}, "evaluation": {"bootstrap": 0}}
    tiles_pkg = train(tile_cfg, out=tmp_path / "tiles", progress=False)
    assert tiles_pkg.card.training["best_score"] > 0.9  # val AUROC of the tile classifier
    cfg = _config(csv, encoder=str(tiles_pkg.path))
    cfg["data"]["calib_fraction"] = 0.25
    bundle = load_bundle(cfg)
    assert bundle.input_spec["channels"] == 512  # resnet18's penultimate features
    assert bundle.input_spec["encoder"]["sha256"] == tiles_pkg.sha256
    slide_pkg = train(cfg, out=tmp_path / "run", progress=False, bundle=bundle)
    assert slide_pkg.card.training["best_score"] >= 0.99
