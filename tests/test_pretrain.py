"""Self-supervised pretraining (``meddx pretrain``): SimCLR views, the NT-Xent loss, and a
backbone file that ``--init-weights`` loads completely, leaving the head fresh."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from meddx.cli import app
from meddx.errors import ConfigError
from meddx.modalities import MODALITIES, get_modality
from meddx.modalities.image.contrastive import ContrastiveViews
from meddx.training.pretrain import SimCLRNet, backbone_of, nt_xent, pretrain

TINY = {"name": "breast-tiny", "seed": 0,
        "data": {"dataset": "breastmnist", "size": 28, "limit": 32},
        "model": {"name": "resnet18"}}


@pytest.fixture(scope="module")
def pretrained(breast_npz: Path, tmp_path_factory: pytest.TempPathFactory):
    """One epoch of SimCLR on 27 BreastMNIST training images (32 less the calib carve)."""
    out = tmp_path_factory.mktemp("pretrain") / "breast.safetensors"
    return pretrain(TINY, out=out, epochs=1, batch_size=9, threads=1, progress=False)


def test_pretraining_writes_the_backbone_without_the_head(pretrained) -> None:
    from safetensors import safe_open

    from meddx.training import build_model_for, load_bundle

    assert pretrained.path.is_file()
    with safe_open(str(pretrained.path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    cfg_bundle = load_bundle(TINY)
    from meddx.modalities.loading import as_config

    full, _, _ = build_model_for(as_config(TINY), cfg_bundle)
    assert keys == set(full.state_dict()) - {"fc.weight", "fc.bias"}
    assert meta["network"] == "resnet18" and meta["dataset"] == "breastmnist"
    assert json.loads(meta["splits"]) == ["train"]
    assert int(meta["n_images"]) == len(cfg_bundle.splits["train"]) == 27
    assert meta["head_removed"] == "fc" and meta["meddx_version"]
    sidecar = json.loads(pretrained.sidecar.read_text())
    assert sidecar["epoch_losses"] and sidecar["epochs_run"] == 1
    assert float(meta["final_loss"]) == pytest.approx(sidecar["final_loss"])


def test_init_weights_loads_every_backbone_tensor_and_a_fresh_head(pretrained, caplog) -> None:
    from safetensors.torch import load_file

    from meddx.modalities.loading import as_config
    from meddx.training import build_model_for, load_bundle

    cfg = as_config({**TINY, "model": {"name": "resnet18",
                                       "init_weights": str(pretrained.path)}})
    with caplog.at_level(logging.INFO, logger="meddx.training"):
        model, _, _ = build_model_for(cfg, load_bundle(cfg))
    saved = load_file(str(pretrained.path))
    own = model.state_dict()
    for key, tensor in saved.items():
        assert torch.equal(own[key], tensor), key
    assert f"loaded {len(saved)} tensors, skipped 0" in caplog.text
    assert "2 left at random init" in caplog.text
    torch.manual_seed(123)
    fresh, _, _ = build_model_for(as_config(TINY), load_bundle(cfg))
    assert not torch.equal(fresh.conv1.weight, saved["conv1.weight"])


def test_nt_xent_is_low_for_matching_pairs_and_high_for_mismatched() -> None:
    z = torch.eye(8) * 3
    matched = nt_xent(z, z, 0.2)
    mismatched = nt_xent(z, z.roll(1, 0), 0.2)
    # 16 unit vectors; a view's partner has similarity 1 (÷ 0.2 → 5), the 14 others 0
    assert matched.item() == pytest.approx(math.log(1 + 14 * math.exp(-5)), rel=1e-4)
    # each partner is orthogonal while one negative is the view itself: the loss is large
    assert mismatched.item() == pytest.approx(math.log(math.exp(5) + 14), rel=1e-4)


def test_nt_xent_goes_down_when_training_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    from meddx.models import build_network

    model = build_network("resnet18", num_outputs=2,
                          spec={"spatial_dims": 2, "in_channels": 1, "size": 12}, options={})
    name, width = backbone_of(model, 2)
    assert name == "fc"
    net = SimCLRNet(model, width, 32)
    v1, v2 = ContrastiveViews(2, 1)(torch.rand(8, 1, 12, 12))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        z1, z2 = net(torch.cat([v1, v2])).chunk(2)
        loss = nt_xent(z1, z2, 0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("dims, channels", [(2, 1), (2, 3), (3, 1)])
def test_views_are_two_different_views_of_the_same_shape(dims, channels) -> None:
    torch.manual_seed(0)
    x = torch.rand(6, channels, *([12] * dims))
    v1, v2 = ContrastiveViews(dims, channels, blur_prob=0.5, noise=0.01)(x)
    assert v1.shape == v2.shape == x.shape
    assert torch.isfinite(v1).all() and not torch.allclose(v1, v2)
    assert not torch.allclose(v1, x)


def test_views_without_randomness_are_the_image_and_flips_are_flips() -> None:
    x = torch.rand(4, 3, 10, 10)
    still = ContrastiveViews(2, 3, crop_scale=(1.0, 1.0), aspect=(1.0, 1.0), flips=False,
                             rotate_degrees=0, jitter_prob=0, grey_prob=0)
    assert torch.allclose(still.view(x), x, atol=1e-5)
    flips = ContrastiveViews(2, 3, crop_scale=(1.0, 1.0), aspect=(1.0, 1.0), flips=True,
                             rotate_degrees=0, jitter_prob=0, grey_prob=0)
    torch.manual_seed(1)
    out = flips.view(x)
    candidates = [x, x.flip(2), x.flip(3), x.flip(2).flip(3)]
    for i in range(len(x)):
        assert any(torch.allclose(out[i], c[i], atol=1e-5) for c in candidates)


@pytest.mark.parametrize("kwargs, said", [
    ({"out": "w.pt"}, "written as .safetensors"),
    ({"batch_size": 1}, "batch size of at least 2"),
    ({"splits": ["tran"]}, "unknown split"),
])
def test_bad_arguments_are_config_errors(tmp_path, kwargs, said) -> None:
    args = {"out": tmp_path / "w.safetensors", **kwargs}
    if isinstance(args["out"], str):
        args["out"] = tmp_path / args["out"]
    with pytest.raises(ConfigError, match=said):
        pretrain(TINY, epochs=1, progress=False, **args)


def test_a_non_image_dataset_is_refused_before_its_data_is_read(tmp_path) -> None:
    cfg = {"name": "af", "data": {"dataset": "physionet2017"}}
    with pytest.raises(ConfigError, match="pretraining supports image modalities"):
        pretrain(cfg, out=tmp_path / "w.safetensors", epochs=1, progress=False)


def invoke(*args: str):
    return CliRunner().invoke(app, ["pretrain", *args])


def test_cli_pretrains_and_tells_how_to_fine_tune(breast_npz, tmp_path) -> None:
    out = tmp_path / "b.safetensors"
    r = invoke("--dataset", "breastmnist", "--limit", "24", "--epochs", "1", "--batch-size",
               "12", "--splits", "train,calib", "--threads", "1", "--no-progress",
               "--out", str(out))
    assert r.exit_code == 0, r.output
    assert out.is_file() and "--init-weights" in r.output
    meta = json.loads(out.with_name(out.name + ".json").read_text())
    assert meta["splits"] == ["train", "calib"] and meta["n_images"] == 24


@pytest.mark.parametrize("args, said", [
    (["--dataset", "breastmnis"], "did you mean 'breastmnist'"),
    (["--dataset", "tox21"], "pretraining supports image modalities"),
    (["--dataset", "breastmnist", "--out", "w.pt"], "--out must end in .safetensors"),
    ([], "give a config file or --dataset"),
])
def test_cli_errors_are_clear(args, said) -> None:
    r = invoke(*args)
    assert r.exit_code != 0
    assert isinstance(r.exception, ConfigError) and said in str(r.exception)


@pytest.mark.parametrize("name", sorted(MODALITIES.names()))
def test_every_modality_either_makes_views_or_says_it_cannot(name) -> None:
    modality = get_modality(name)
    try:
        answer = modality.contrastive_views(None)
    except ConfigError as e:
        assert "pretraining supports image modalities" in e.message
    else:
        assert answer is None  # it can: views come once the data's input_spec is known
        views = modality.contrastive_views({"spatial_dims": 2, "channels": 1, "size": 16})
        v1, v2 = views(torch.rand(4, 1, 16, 16))
        assert v1.shape == v2.shape == (4, 1, 16, 16)


def test_an_ensemble_recipe_pretrains_one_plain_network_and_every_member_loads_it(
        pretrained, tmp_path) -> None:
    """configs/breastmnist.yaml ships `members: 3, tta: flips`: pretraining ignores both (one
    plain backbone), and each member of the ensemble starts from the file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from meddx.modalities.loading import as_config
    from meddx.models.combine import Ensemble
    from meddx.training import build_model_for, load_bundle

    ens = {**TINY, "model": {"name": "resnet18", "options": {"members": 2, "tta": "flips"}}}
    out = pretrain(ens, out=tmp_path / "ens.safetensors", epochs=1, batch_size=9, threads=1,
                   progress=False)
    with safe_open(str(out.path), "pt") as f:
        names = f.keys()
    assert names and not any(k.startswith(("members.", "net.")) for k in names)
    cfg = as_config({**ens, "model": {**ens["model"], "init_weights": str(pretrained.path)}})
    template, _, _ = build_model_for(cfg, load_bundle(cfg))
    assert isinstance(template, Ensemble)
    saved = load_file(str(pretrained.path))
    for member in template.members:
        assert torch.equal(member.state_dict()["conv1.weight"], saved["conv1.weight"])
