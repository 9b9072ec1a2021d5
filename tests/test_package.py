"""ModelPackage: safetensors + card + manifest, sha256-checked, never unpickled."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from meddx.errors import ModelError
from meddx.models import build_network
from meddx.package import ModelCard, load_package, save_package
from meddx.tasks import TaskSpec


@pytest.fixture()
def package_dir(tmp_path: Path) -> Path:
    task = TaskSpec(kind="binary", class_names=["malignant", "benign"], positive_class="malignant")
    spec = {"spatial_dims": 2, "channels": 1, "size": 28}
    model = build_network("resnet18", num_outputs=1, spec={"spatial_dims": 2, "in_channels": 1,
                                                           "size": 28})
    card = ModelCard(name="t", modality="image", task=task, network={"name": "resnet18"},
                     preprocessing=spec)
    save_package(tmp_path / "pkg", model, card)
    return tmp_path / "pkg"


def test_round_trip_and_files(package_dir: Path) -> None:
    pkg = load_package(package_dir)
    assert sorted(p.name for p in package_dir.iterdir()) == ["card.json", "manifest.json",
                                                             "weights.safetensors"]
    manifest = json.loads((package_dir / "manifest.json").read_text())
    assert set(manifest) == {"card.json", "weights.safetensors"}
    assert pkg.build_model()  # the card names the network; weights fit it
    assert (package_dir / "weights.safetensors").read_bytes()[:8] != b"\x80\x02\x8a\x0a"  # no pickle


def test_changed_weights_or_card_are_refused(package_dir: Path, tmp_path: Path) -> None:
    for name in ("weights.safetensors", "card.json"):
        copy = tmp_path / f"copy_{name}"
        shutil.copytree(package_dir, copy)
        with (copy / name).open("ab") as f:
            f.write(b" ")
        with pytest.raises(ModelError, match=f"{name} was changed"):
            load_package(copy)


def test_missing_file_or_folder(package_dir: Path, tmp_path: Path) -> None:
    (package_dir / "weights.safetensors").unlink()
    with pytest.raises(ModelError, match="weights.safetensors is missing"):
        load_package(package_dir)
    with pytest.raises(ModelError, match="no model package"):
        load_package(tmp_path / "nothing")


def test_update_card_rewrites_manifest(package_dir: Path) -> None:
    pkg = load_package(package_dir)
    pkg.update_card(version="2.0.0")
    assert load_package(package_dir).card.version == "2.0.0"
