"""``meddx train --option KEY=VALUE``: data options from the command line, read as YAML and
checked against the modality before any data is loaded."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from meddx.cli import app
from meddx.errors import ConfigError


@pytest.fixture
def trained(monkeypatch) -> list:
    """Stand in for training: record the config the command built (and train nothing)."""
    seen: list = []

    def fake_train(cfg, out=None, resume=False, progress=True):
        seen.append(cfg)
        return None  # what a non-zero DDP rank gets: the command ends quietly

    monkeypatch.setattr("meddx.training.train", fake_train)
    return seen


def invoke(*args: str):
    return CliRunner().invoke(app, ["train", *args])


def test_options_are_read_as_yaml_into_data_options(trained) -> None:
    r = invoke("--dataset", "physionet2017", "--no-recipe", "--option", "fs=100",
               "--option", "leads=[ECG]", "--option", "cache=false",
               "--option", "window_seconds=10.5", "--option", "split_lists=p17",
               "--option", "fs=125")
    assert r.exit_code == 0, r.output
    [cfg] = trained
    assert cfg.data.options == {"fs": 125, "leads": ["ECG"], "cache": False,
                                "window_seconds": 10.5, "split_lists": "p17"}  # last fs wins


def test_options_add_to_the_config_files_options(trained) -> None:
    r = invoke("configs/physionet2017.yaml", "--option", "window_seconds=10")
    assert r.exit_code == 0, r.output
    [cfg] = trained
    assert cfg.data.options["window_seconds"] == 10
    assert cfg.data.options["fs"] == 100 and cfg.data.options["stride_seconds"] == 15


@pytest.mark.parametrize("option, said", [
    ("fs", "--option 'fs' is not KEY=VALUE"),
    ("=100", "--option '=100' is not KEY=VALUE"),
    ("data.options.fs=100", "'data.options.fs' is not an option name"),
    ("window_second=10", "unknown --option 'window_second' for ecg data; did you mean "
                         "'window_seconds'?. ecg data options: baseline_wander, cache, "),
    ("speed=100", "for ecg data; choose one of: baseline_wander, cache, format, fs, "),
    ("fs=[1, 2", "--option fs: the value '[1, 2' is not valid YAML"),
    ("fs=fast", "invalid data.options for modality 'ecg'"),
])
def test_bad_options_are_config_errors_before_training(trained, option, said) -> None:
    r = invoke("--dataset", "physionet2017", "--option", option)
    assert isinstance(r.exception, ConfigError), r.output
    assert said in str(r.exception)
    assert trained == []


@pytest.mark.slow
def test_dataset_alone_trains_its_shipped_recipe(tmp_path) -> None:
    """``meddx train --dataset physionet2017`` trains what the benchmark measured: a real
    (tiny) run, and the package's card records the recipe's network and the flags on top."""
    import json

    import yaml

    from conftest import require_data
    from meddx.catalog import recipe_for

    require_data("ecg/physionet2017")
    recipe = yaml.safe_load(recipe_for("physionet2017").read_text())
    r = invoke("--dataset", "physionet2017", "--epochs", "1", "--limit", "32",
               "--option", "window_seconds=10", "--out", str(tmp_path / "af"), "--no-progress")
    assert r.exit_code == 0, r.output
    assert "recipe: physionet2017.yaml" in r.output
    card = json.loads((tmp_path / "af" / "model" / "card.json").read_text())
    used = card["training"]["config"]
    assert card["network"]["name"] == recipe["model"]["name"]
    assert card["network"]["options"] == recipe["model"]["options"]
    assert used["train"]["lr"] == recipe["train"]["lr"] and used["train"]["epochs"] == 1
    assert used["data"]["options"] == {**recipe["data"]["options"], "window_seconds": 10}


def test_another_model_drops_the_recipes_network_options(trained) -> None:
    r = invoke("--dataset", "physionet2017", "--model", "cnn_gru")
    assert r.exit_code == 0, r.output
    [cfg] = trained
    assert cfg.model.name == "cnn_gru" and cfg.model.options == {}


def test_no_recipe_and_datasets_without_one_use_plain_defaults(trained) -> None:
    from meddx.catalog import recipe_for
    from meddx.config import ExperimentConfig

    assert recipe_for("pathmnist") is None
    for args in (["--dataset", "physionet2017", "--no-recipe"], ["--dataset", "pathmnist"]):
        r = invoke(*args)
        assert r.exit_code == 0, r.output
        assert "recipe:" not in r.output
    defaults = ExperimentConfig(name="x")
    assert [c.model.options for c in trained] == [defaults.model.options] * 2
    assert [c.train.lr for c in trained] == [defaults.train.lr] * 2
