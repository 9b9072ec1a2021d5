"""A slide package carries its tile encoder (issue 24, point 4): copied alone it loads and
predicts the same, its manifest and signature cover the encoder's files, the bag cache key
stays the encoder's identity, and a package made before (encoder named by path) still loads and
can be re-packaged with ``meddx wsi embed-encoder``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("meddx.modalities.pathology.slide", reason="slide reading (path-io) absent")

from meddx.errors import ConfigError, ModelError  # noqa: E402
from meddx.package import load_package  # noqa: E402
from meddx.signing import (  # noqa: E402
    check_package_files,
    generate_key_pair,
    sign_package,
    write_manifest,
)
from pathology_model_support import (  # noqa: E402
    slide_pixels,
    untrained_slide_package,
    untrained_tile_encoder,
    write_slide,
)

MEDDX = [str(Path(sys.executable).parent / "meddx")]


def meddx(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MEDDX, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bundle_slide")
    return write_slide(folder / "s01.tiff", slide_pixels((512, 512), True, 1))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return untrained_tile_encoder(tmp_path_factory.mktemp("bundle_encoder"))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MEDDX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _probabilities(model: Path, slide: Path) -> np.ndarray:
    from meddx.inference import load_model

    pred = load_model(model).predict([str(slide)])[0]
    return np.asarray([pred.probabilities[k] for k in ("normal", "tumour")])


def _stored_encoder(model: Path) -> dict:
    return json.loads((model / "card.json").read_text())["preprocessing"]["encoder"]


def _bags(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "pathology").glob("*.safetensors"))


def test_a_slide_package_copied_alone_predicts_the_same(tmp_path, cache, slide, monkeypatch
                                                        ) -> None:
    tiles = untrained_tile_encoder(tmp_path / "tiles")
    made = untrained_slide_package(tmp_path / "made", encoder=tiles.path)
    stored = _stored_encoder(made.path)
    assert stored["path"] == "encoder" and stored["bundled"] is True  # no path outside it
    assert stored["sha256"] == tiles.sha256 and stored["name"] == "tiles"
    # the encoder's weights byte for byte, listed in the slide package's manifest
    assert made.manifest["encoder/weights.safetensors"] == tiles.sha256
    assert {"encoder/card.json", "encoder/manifest.json"} <= set(made.manifest)
    before = _probabilities(made.path, slide)
    bags_before = _bags(cache)

    moved = shutil.copytree(made.path, tmp_path / "elsewhere" / "model")
    shutil.rmtree(tmp_path / "made")
    shutil.rmtree(tmp_path / "tiles")  # the encoder package it was made from is gone
    monkeypatch.setenv("MEDDX_CACHE", str(tmp_path / "cache2"))  # embedded afresh
    loaded = load_package(moved)
    assert loaded.card.preprocessing["encoder"]["path"] == str((moved / "encoder").resolve())
    after = _probabilities(moved, slide)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-6)
    # the bag cache key is the encoder's identity, not where it lies
    assert _bags(tmp_path / "cache2") == bags_before and len(bags_before) == 1

    # a card update rewrites the package; the card still names the encoder inside it
    loaded.update_card(intended_use="Research on slide packaging.")
    assert _stored_encoder(moved)["path"] == "encoder"
    assert sorted(p.name for p in (moved / "encoder").iterdir()) == [
        "card.json", "manifest.json", "weights.safetensors"]
    np.testing.assert_allclose(_probabilities(moved, slide), before, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_signature_and_meddx_verify_cover_the_encoder(tmp_path, encoder) -> None:
    made = untrained_slide_package(tmp_path / "made", encoder=encoder.path)
    key, pub = generate_key_pair(tmp_path / "keys")
    sign_package(made.path, key)
    assert load_package(made.path, trust=[pub]).signer
    ok = meddx("verify", str(made.path), "--trust-key", str(pub))
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stderr

    weights = made.path / "encoder" / "weights.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0x01  # one bit of the encoder's last weight
    weights.write_bytes(bytes(blob))
    with pytest.raises(ModelError, match="encoder/weights.safetensors was changed"):
        load_package(made.path, trust=[pub])
    with pytest.raises(ModelError, match="encoder/weights.safetensors was changed"):
        load_package(made.path)
    bad = meddx("verify", str(made.path), "--trust-key", str(pub))
    assert bad.returncode == 2 and "encoder/weights.safetensors was changed" in bad.stderr


def test_a_manifest_that_leaves_the_encoder_out_does_not_load(tmp_path, encoder) -> None:
    made = untrained_slide_package(tmp_path / "made", encoder=encoder.path)
    manifest = json.loads((made.path / "manifest.json").read_text())
    for name in [n for n in manifest if n.startswith("encoder/")]:
        del manifest[name]
    (made.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="does not list its tile encoder") as e:
        load_package(made.path)
    assert "embed-encoder" in e.value.hint


def test_manifest_names_outside_the_package_are_refused(tmp_path, tiny_sequence_package
                                                        ) -> None:
    package = shutil.copytree(tiny_sequence_package.path, tmp_path / "pkg" / "model")
    outside = tmp_path / "pkg" / "secret.txt"
    outside.write_text("not part of the package")
    manifest = json.loads((package / "manifest.json").read_text())
    manifest["../secret.txt"] = __import__("hashlib").sha256(outside.read_bytes()).hexdigest()
    (package / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="not a file inside the package"):
        load_package(package)
    with pytest.raises(ModelError, match="missing"):
        check_package_files(package)


def _as_made_before(model: Path, encoder: Path) -> Path:
    """Rewrite a slide package as packages were made before they carried their encoder: the
    card names the encoder package by its absolute path and sha256, nothing in ``encoder/``."""
    card = json.loads((model / "card.json").read_text())
    enc = card["preprocessing"]["encoder"]
    card["preprocessing"]["encoder"] = {"kind": "package", "path": str(encoder.resolve()),
                                        "sha256": enc["sha256"], "dim": enc["dim"]}
    (model / "card.json").write_text(json.dumps(card, indent=2))
    shutil.rmtree(model / "encoder")
    write_manifest(model)
    return model


@pytest.mark.slow
def test_a_package_made_before_still_loads_and_is_repackaged(tmp_path, cache, slide) -> None:
    tiles = untrained_tile_encoder(tmp_path / "tiles")
    made = untrained_slide_package(tmp_path / "made", encoder=tiles.path)
    want = _probabilities(made.path, slide)
    old = _as_made_before(made.path, tiles.path)
    assert "encoder/weights.safetensors" not in load_package(old).manifest
    np.testing.assert_allclose(_probabilities(old, slide), want, rtol=0, atol=1e-6)

    moved = tmp_path / "tiles-moved"
    shutil.move(tmp_path / "tiles", moved)
    with pytest.raises(ModelError, match="neither in its package nor at") as e:
        _probabilities(old, slide)
    assert "meddx wsi embed-encoder" in e.value.hint

    other = untrained_tile_encoder(tmp_path / "other", size=96)  # another network's weights
    from meddx.modalities.pathology.bundle import embed_encoder

    with pytest.raises(ModelError, match="differs from the one this slide model was trained"):
        embed_encoder(old, other.path)
    with pytest.raises(ConfigError, match="no tile-encoder package"):
        embed_encoder(untrained_slide_package(tmp_path / "stats").path)

    done = meddx("wsi", "embed-encoder", str(old), "--encoder", str(moved / "model"))
    assert done.returncode == 0, done.stderr
    assert _stored_encoder(old)["bundled"] is True
    shutil.rmtree(moved)
    np.testing.assert_allclose(_probabilities(old, slide), want, rtol=0, atol=1e-6)
