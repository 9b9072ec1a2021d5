"""errors, registry, config, catalog."""

from __future__ import annotations

from pathlib import Path

import pytest

from meddx.catalog import catalog, data_roots, get_entry, is_available, resolve
from meddx.config import ExperimentConfig, dump_config, load_config
from meddx.errors import ConfigError, DataError, MeddxError
from meddx.registry import Registry
from meddx.tasks import TaskSpec

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_registry_lazy_entries_duplicates_and_suggestions() -> None:
    reg: Registry = Registry("widget")
    reg.register("json-dumps", "json:dumps")
    assert reg.get("JSON-dumps").__name__ == "dumps"
    with pytest.raises(ConfigError, match="already registered"):
        reg.register("json-dumps", "json:loads")
    with pytest.raises(ConfigError, match="did you mean 'json-dumps'"):
        reg.get("json-dump")
    with pytest.raises(ConfigError, match="module:attr"):
        reg.register("bad", "json.dumps")


def test_unknown_model_name_suggests() -> None:
    from meddx.models import build_network

    with pytest.raises(ConfigError, match="did you mean 'resnet18'"):
        build_network("resnt18", num_outputs=2, spec={"spatial_dims": 2, "in_channels": 1,
                                                      "size": 28})


def test_small_inputs_refused_for_densenet_with_reason() -> None:
    from meddx.models import build_network

    with pytest.raises(ConfigError, match="at least 32 px"):
        build_network("densenet121", num_outputs=2,
                      spec={"spatial_dims": 2, "in_channels": 1, "size": 28})


def test_errors_carry_context_and_hint() -> None:
    e = DataError("label 7 is not one of the task's classes", sample_id="img_3", hint="fix it")
    assert isinstance(e, MeddxError)
    assert "sample_id=img_3" in str(e) and "fix it" in str(e)
    assert e.to_dict()["context"] == {"sample_id": "img_3"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_bundled_configs_parse_and_round_trip(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert cfg.data.dataset in catalog()


def test_config_unknown_key_is_named(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ntrain:\n  epocs: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'train.epocs'"):
        load_config(p)


def test_config_is_frozen_and_updated_copies() -> None:
    cfg = ExperimentConfig()
    with pytest.raises(ValueError):
        cfg.seed = 3  # type: ignore[misc]
    assert cfg.updated(**{"train.epochs": 3}).train.epochs == 3
    assert cfg.train.epochs != 3


def test_catalog_has_all_medmnist_and_suggests() -> None:
    names = set(catalog())
    assert len({n for n in names if "mnist" in n}) == 18
    assert get_entry("breastmnist").task.positive_class == "malignant"
    assert get_entry("retinamnist").task.kind == "ordinal"
    assert get_entry("chestmnist").task.kind == "multilabel"
    with pytest.raises(ConfigError, match="did you mean 'breastmnist'"):
        get_entry("breastmnst")


def test_missing_dataset_says_where_it_looked_and_how_to_get_it(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("MEDDX_DATA", str(tmp_path))
    monkeypatch.setenv("MEDDX_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    entry = get_entry("pathmnist")
    if is_available(entry):
        pytest.skip("pathmnist unexpectedly available")
    with pytest.raises(DataError) as info:
        resolve(entry)
    text = str(info.value)
    assert "not available offline" in text and "meddx datasets --download pathmnist" in text
    assert str(tmp_path) in text


def test_bundled_breastmnist_is_found(breast_npz: Path) -> None:
    assert resolve("breastmnist")[0].resolve() == breast_npz.resolve()
    assert any(r.exists() for r in data_roots())


def test_label_outside_classes_is_a_data_error() -> None:
    task = TaskSpec(kind="multiclass", class_names=["a", "b"], label_values=["A", "B"])
    assert task.encode("B") == 1
    with pytest.raises(DataError, match="not one of the task's classes"):
        task.encode("C", sample_id="row 4")
