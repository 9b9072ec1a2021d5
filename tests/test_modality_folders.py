"""Every modality folder keeps the convention that makes "one folder + one line" work: its
``__init__`` holds only strings, and what it names imports and fits the contracts."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from meddx.catalog import catalog
from meddx.config import load_config
from meddx.fhir.cds import CdsAdapter
from meddx.modalities import MODALITIES, PACKAGES, Modality
from meddx.registry import load_target

FOLDERS = Path(__file__).resolve().parents[1] / "src" / "meddx" / "modalities"


@pytest.mark.parametrize("name", PACKAGES)
def test_folder_init_holds_only_strings(name: str) -> None:
    """``import meddx.modalities`` must not import any modality's code (or its libraries)."""
    tree = ast.parse((FOLDERS / name / "__init__.py").read_text())
    for node in tree.body:
        assert not isinstance(node, ast.Import | ast.ImportFrom), f"{name}: imports in __init__"
        if isinstance(node, ast.Assign):
            value = ast.literal_eval(node.value)  # fails on anything but literals
            assert value is None or isinstance(value, str | dict)


@pytest.mark.parametrize("name", PACKAGES)
def test_what_a_folder_registers_fits_the_contracts(name: str) -> None:
    package = importlib.import_module(f"meddx.modalities.{name}")
    own = f"meddx.modalities.{name}."
    modalities = package.MODALITIES
    assert modalities, f"{name} registers no modality"
    for key, target in modalities.items():
        assert target.startswith(own), f"{target} lives outside its folder"
        cls = load_target(target)
        assert issubclass(cls, Modality) and cls.name == key
        assert MODALITIES.get(key) is cls
    for key, target in (package.NETWORKS or {}).items():
        assert target.startswith(own)
        builder = load_target(target)
        assert builder.modality in modalities, f"network {key} serves {builder.modality}"
    for key, target in (package.CDS_ADAPTERS or {}).items():
        assert key in modalities and target.startswith(own)
        assert issubclass(load_target(target), CdsAdapter)
    if package.COMMANDS:
        assert package.COMMANDS.startswith(own)
        assert callable(load_target(package.COMMANDS))


@pytest.mark.parametrize("recipe", sorted(FOLDERS.glob("*/recipes/*.yaml")), ids=lambda p: p.stem)
def test_recipes_parse_and_belong_to_their_folder(recipe: Path) -> None:
    cfg = load_config(recipe)
    entry = catalog().get(cfg.data.dataset) if cfg.data.dataset else None
    modality = cfg.data.modality or (entry.modality if entry else None)
    package = importlib.import_module(f"meddx.modalities.{recipe.parents[1].name}")
    assert modality in package.MODALITIES, f"{recipe.name} trains a {modality} model"


def test_catalog_entries_name_registered_modalities() -> None:
    names = set(MODALITIES.names())
    assert {e.modality for e in catalog().values()} <= names


def test_the_configs_folder_links_every_recipe() -> None:
    configs = Path(__file__).resolve().parents[1] / "configs"
    recipes = {p.name for p in FOLDERS.glob("*/recipes/*.yaml")}
    linked = {p.name for p in configs.iterdir() if p.resolve().is_file()}
    assert recipes == linked, "configs/ should link every recipe (ln -s)"
    for p in configs.iterdir():
        assert FOLDERS in p.resolve().parents
