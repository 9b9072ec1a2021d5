"""Archive inference on a real two-node Ray cluster: same numbers as single-process predict,
exactly once, resumable, and a worker node killed mid-run costs no row and adds none."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from meddx.cluster.sources import InputRef, list_inputs
from meddx.errors import ConfigError, DataError
from pathology_model_support import untrained_slide_package
from ray_support import actor_classes, ray_cluster, ray_env  # noqa: F401

SUFFIXES = (".png", ".dcm")


@pytest.fixture(scope="module")
def breast_package(tmp_path_factory, breast_npz: Path):
    """An untrained small ResNet-18 for BreastMNIST whose card carries a temperature, an
    operating point and a conformal threshold: every column of a result row is exercised,
    without a training run (the numbers are compared, not judged)."""
    from evaluation_support import untrained_package
    from meddx.package import Calibration, Conformal, OperatingPoint, load_package, save_package

    out = tmp_path_factory.mktemp("breast_pkg")
    pkg, _ = untrained_package({"name": "breast-untrained", "seed": 0,
                                "data": {"dataset": "breastmnist", "limit": 40}}, out / "raw")
    card = pkg.card.model_copy(update={
        "calibration": Calibration(temperature=1.7),
        "operating_points": {"balanced": OperatingPoint(method="balanced", threshold=0.48,
                                                        positive_class=pkg.card.task.positive_class)},
        "default_operating_point": "balanced",
        "conformal": Conformal(threshold=0.52)})
    return save_package(out / "model", load_package(pkg.path).build_model().eval(), card)


def _write_pngs(folder: Path, npz: Path, count: int, start: int = 0) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    images = np.load(npz)["test_images"]
    names = []
    for i in range(start, start + count):
        name = f"case{i:04d}.png"
        Image.fromarray(images[i % len(images)]).save(folder / name)
        names.append(name)
    return names


def _meddx(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = ray_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parents[1] / "src"),
                                                     env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "meddx.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def _ray_args(address: str, out: Path, block: int, workers: int = 2) -> list[str]:
    return ["--ray", address, "--out", str(out), "--batch-size", str(block), "--workers",
            str(workers), "--worker-cpus", "0.5", "--read-cpus", "0.5"]


def _rows(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(out).to_pylist()


# ---------------------------------------------------------------- sources (no Ray needed)
def test_a_folder_lists_inputs_by_relative_path(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    for rel in ("a/x.png", "a/b/y.PNG", "a/notes.xyz"):
        (tmp_path / rel).write_bytes(b"")
    refs = list_inputs(tmp_path / "a", SUFFIXES)
    assert [r.id for r in refs] == ["b/y.PNG", "x.png"]
    assert refs[1].source == str(tmp_path / "a" / "x.png")


def test_a_manifest_resolves_relative_paths_and_refuses_duplicate_ids(tmp_path: Path) -> None:
    m = tmp_path / "m.csv"
    m.write_text("path,id\nimgs/one.png,s1\n/abs/two.png,\n")
    assert list_inputs(m, SUFFIXES) == [InputRef("s1", str(tmp_path / "imgs" / "one.png")),
                                        InputRef("/abs/two.png", "/abs/two.png")]
    m.write_text("path,id\na.png,s1\nb.png,s1\n")
    with pytest.raises(DataError, match="share one id"):
        list_inputs(m, SUFFIXES)
    m.write_text("file\na.png\n")
    with pytest.raises(ConfigError, match="no 'path' column"):
        list_inputs(m, SUFFIXES)
    with pytest.raises(ConfigError, match="neither a folder nor a CSV"):
        list_inputs(tmp_path / "missing.txt", SUFFIXES)


def test_ray_needs_out_and_one_source(breast_package, tmp_path: Path) -> None:
    from meddx.cli import app

    r = CliRunner().invoke(app, ["predict", str(breast_package.path), str(tmp_path),
                                 "--ray", "local"])
    assert r.exit_code != 0 and "--ray needs --out" in str(r.exception or r.output)


# ---------------------------------------------------------------- on the cluster
@pytest.mark.slow
def test_archive_rows_equal_single_process_predict_and_a_rerun_skips_them(
        ray_cluster, breast_package, breast_npz: Path, tmp_path: Path) -> None:  # noqa: F811
    from meddx.cli import app

    folder = tmp_path / "archive"
    names = _write_pngs(folder, breast_npz, 30)
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "results.parquet"
    model = str(breast_package.path)
    done = _meddx("predict", model, str(folder), *_ray_args(ray_cluster.address, out, 8))
    assert done.returncode == 1, done.stderr[-3000:]  # one input has an error
    rows = {r["id"]: r for r in _rows(out)}
    assert sorted(rows) == sorted([*names, "broken.png"])
    assert rows["broken.png"]["error"] and rows["broken.png"]["probabilities"] is None

    single = CliRunner().invoke(app, ["predict", model, *[str(folder / n) for n in names],
                                      "--format", "json"])
    assert single.exit_code == 0, single.output
    ref = json.loads(single.stdout)["predictions"]
    assert len(ref) == len(names)
    for want in ref:
        got = rows[want["id"]]
        assert got["error"] is None
        for key in ("probabilities", "calibrated"):
            assert dict(got[key]).keys() == want[key].keys()
            for cls, v in want[key].items():
                assert dict(got[key])[cls] == pytest.approx(v, abs=1e-5)
        assert got["decision"] == want["decision"]
        assert got["operating_point"] == want["operating_point"]
        assert got["conformal_set"] == want["prediction_set"]
        assert got["most_likely_class"] == want["label"]
        assert got["threshold"] == pytest.approx(want["threshold"])
        assert got["ood"] == want["ood"]

    again = _meddx("predict", model, str(folder), *_ray_args(ray_cluster.address, out, 8))
    said = " ".join(again.stderr.split())  # the console wraps long lines (a long tmp path)
    assert "0 rows written" in said and "31 already there" in said
    # a lost part (or inputs added later) is all a rerun computes
    parts = sorted(out.glob("part-*.parquet"))
    parts[0].unlink()
    _write_pngs(folder, breast_npz, 3, start=30)
    _meddx("predict", model, str(folder), *_ray_args(ray_cluster.address, out, 8))
    ids = Counter(r["id"] for r in _rows(out))
    assert set(ids) == {*names, "broken.png", "case0030.png", "case0031.png", "case0032.png"}
    assert max(ids.values()) == 1


@pytest.mark.slow
def test_blocks_are_read_by_long_lived_reader_actors(
        ray_cluster, breast_package, breast_npz: Path, tmp_path: Path) -> None:  # noqa: F811
    """Six blocks are read by the one reader actor asked for (--readers 1), not by a task
    process per block, each of which would import torch and the modality again."""
    folder = tmp_path / "archive"
    _write_pngs(folder, breast_npz, 24)
    out = tmp_path / "r.parquet"
    before = set(actor_classes(ray_cluster.address))
    done = _meddx("predict", str(breast_package.path), str(folder), "--ray",
                  ray_cluster.address, "--out", str(out), "--batch-size", "4", "--workers", "1",
                  "--readers", "1", "--worker-cpus", "0.5", "--read-cpus", "0.5")
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(_rows(out)) == 24
    new = [a.split("|")[0] for a in set(actor_classes(ray_cluster.address)) - before]
    # Ray Data runs both stages' actors as its map workers: one reader, one predictor
    assert len([c for c in new if "MapWorker" in c]) == 2, new


@pytest.mark.slow
def test_results_of_another_model_are_not_mixed(ray_cluster, breast_package,  # noqa: F811
                                               tmp_path: Path) -> None:
    out = tmp_path / "r.parquet"
    out.mkdir()
    (out / "_job.json").write_text(json.dumps({"model_sha256": "0" * 64}))
    done = _meddx("predict", str(breast_package.path), str(tmp_path),
                  *_ray_args(ray_cluster.address, out, 8))
    assert done.returncode != 0 and "another model package" in done.stderr


@pytest.mark.slow
def test_a_killed_worker_node_loses_and_duplicates_nothing(
        ray_cluster, breast_package, breast_npz: Path, tmp_path: Path) -> None:  # noqa: F811
    folder = tmp_path / "archive"
    names = _write_pngs(folder, breast_npz, 240)
    out = tmp_path / "results.parquet"
    env = ray_env()
    env["PYTHONPATH"] = str(Path(__file__).parents[1] / "src")
    job = subprocess.Popen([sys.executable, "-m", "meddx.cli", "predict",
                            str(breast_package.path), str(folder),
                            *_ray_args(ray_cluster.address, out, 4)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while len(list(out.glob("part-*.parquet"))) < 3 and job.poll() is None:
            assert time.monotonic() < deadline, "no parts written"
            time.sleep(0.2)
        assert job.poll() is None, "the job ended before the worker node could be killed"
        ray_cluster.kill_worker()
        _, stderr = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
        ray_cluster.restart_worker()
    assert job.returncode == 0, stderr[-3000:]
    ids = Counter(r["id"] for r in _rows(out))
    assert sorted(ids) == sorted(names)
    assert set(ids.values()) == {1}
    assert not list(out.glob(".part-*"))


# ---------------------------------------------------------------- a cohort of slides
@pytest.fixture(scope="module")
def slide_package(tmp_path_factory):
    """An untrained ABMIL over the stats encoder (the cohort mechanics, not the accuracy)."""
    return untrained_slide_package(tmp_path_factory.mktemp("slide_pkg"))


@pytest.mark.slow
def test_a_slide_cohort_fills_the_shared_bag_cache_and_matches_local_prediction(
        ray_cluster, slide_package, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    from meddx.inference import load_model
    from pathology_model_support import slide_pixels, write_slide

    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(3):
        write_slide(slides / f"s{i}.tiff", slide_pixels((256, 256), i == 1, i))
    (slides / "bad.svs").write_bytes(b"II*\x00" + b"\x00" * 500)
    cache, out = tmp_path / "shared-cache", tmp_path / "cohort.parquet"
    done = _meddx("cluster", "wsi", str(slide_package.path), str(slides), "--ray",
                  ray_cluster.address, "--out", str(out), "--cache", str(cache),
                  "--worker-cpus", "0.5", "--read-cpus", "0.5")
    assert done.returncode == 1, done.stderr[-3000:]  # bad.svs is an error row
    rows = {r["id"]: r for r in _rows(out)}
    assert sorted(rows) == ["bad.svs", "s0.tiff", "s1.tiff", "s2.tiff"]
    assert rows["bad.svs"]["error"]
    bags = sorted((cache / "pathology").glob("*.safetensors"))
    assert len(bags) == 3
    # the local path finds those very bags (same cache keys) and gives the same numbers
    monkeypatch.setenv("MEDDX_CACHE", str(cache))
    local = load_model(slide_package.path).predict([str(slides / f"s{i}.tiff") for i in range(3)])
    for p in local:
        got = dict(rows[p.id]["probabilities"])
        for cls, v in p.probabilities.items():
            assert got[cls] == pytest.approx(v, abs=1e-5)
    assert sorted((cache / "pathology").glob("*.safetensors")) == bags
