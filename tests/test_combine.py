"""Seed ensembles and test-time augmentation: one mechanism for every network, one package,
one ONNX graph that predicts what torch predicts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meddx.errors import ConfigError
from meddx.models import build_network
from meddx.models.combine import Ensemble, FlipTTA, flip_views
from meddx.models.explain import explained_parts

SPEC = {"spatial_dims": 2, "in_channels": 1, "size": 16}


def test_flip_views_cover_every_flip_once_with_the_identity_last():
    assert flip_views("hflip", 2) == [(3,), ()]
    assert sorted(flip_views("flips", 2)) == sorted([(2, 3), (2,), (3,), ()])
    assert flip_views("flips", 2)[-1] == ()
    assert len(flip_views("flips", 3)) == 8
    with pytest.raises(ConfigError, match="unknown test-time augmentation"):
        flip_views("rot90", 2)


def test_build_network_wraps_any_image_network_in_an_ensemble_and_tta():
    torch.manual_seed(0)
    net = build_network("resnet18", num_outputs=2, spec=SPEC,
                        options={"members": 3, "tta": "flips"}).eval()
    assert isinstance(net, FlipTTA) and isinstance(net.net, Ensemble)
    assert len(net.net.members) == 3
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        by_hand = torch.stack([m(x.flip(v) if v else x) for m in net.net.members
                               for v in flip_views("flips", 2)]).mean(0)
        out = net(x)
    assert out.shape == (5, 2)
    torch.testing.assert_close(out, by_hand, rtol=1e-5, atol=1e-5)
    # the members differ (independently initialised), so the mean is not one member
    with torch.no_grad():
        assert not torch.allclose(net.net.members[0](x), net.net.members[1](x))
    # an explainer sees every member on every view (flip axes counted from the end)
    members, views = explained_parts(net)
    assert members == list(net.net.members)
    assert sorted(views) == sorted([(-2, -1), (-2,), (-1,), ()])


def test_tta_and_members_are_refused_where_they_make_no_sense():
    with pytest.raises(ConfigError, match="image networks"):
        build_network("resnet1d", num_outputs=2,
                      spec={"spatial_dims": 1, "in_channels": 1, "size": 300},
                      options={"tta": "flips"})
    with pytest.raises(ConfigError, match="whole number"):
        build_network("resnet18", num_outputs=2, spec=SPEC, options={"members": 0})
    with pytest.raises(ConfigError, match="unknown test-time augmentation"):
        build_network("resnet18", num_outputs=2, spec=SPEC, options={"tta": "rot"})


def test_ensemble_members_must_share_an_architecture():
    a = build_network("resnet18", num_outputs=2, spec=SPEC)
    b = build_network("resnet34", num_outputs=2, spec=SPEC)
    with pytest.raises(ConfigError, match="one architecture"):
        Ensemble.from_members([a, b])


@pytest.fixture(scope="module")
def second_breast_package(tmp_path_factory, breast_npz):
    """A second tiny BreastMNIST run on the same split (same seed and data), other init."""
    from meddx.training import train

    torch.manual_seed(123)
    return train({"name": "breast-tiny-b", "seed": 0,
                  "data": {"dataset": "breastmnist", "limit": 160},
                  "model": {"name": "resnet18", "options": {"dropout": 0.1}},
                  "train": {"epochs": 1, "batch_size": 32, "early_stopping_patience": None}},
                 out=tmp_path_factory.mktemp("breast_b"), progress=False)


def test_join_packages_refuses_other_recipes_and_splits(tiny_breast_package,
                                                        second_breast_package, tmp_path):
    from meddx.training import train
    from meddx.training.combine import join_packages

    # different network options: not one recipe
    with pytest.raises(ConfigError, match="differ in network options"):
        join_packages([tiny_breast_package.path, second_breast_package.path], tmp_path / "x")
    with pytest.raises(ConfigError, match="nothing to do"):
        join_packages([tiny_breast_package.path], tmp_path / "y", tta="none")
    # another seed carves another calibration split from train: no unseen calib for both
    cfg = tiny_breast_package.card.training["config"]
    seed1 = train({**cfg, "seed": 1, "name": "breast-tiny-s1",
                   "train": {**cfg["train"], "epochs": 1}}, out=tmp_path / "s1", progress=False)
    with pytest.raises(ConfigError, match="different splits"):
        join_packages([tiny_breast_package.path, seed1.path], tmp_path / "z")
    joined = join_packages([tiny_breast_package.path, seed1.path], tmp_path / "z",
                           post_hoc=False)
    assert joined.card.calibration is None and not joined.card.operating_points


def test_ensemble_and_tta_package_predicts_the_same_through_torch_and_onnx(
        tiny_breast_package, tmp_path, breast_npz):
    """The acceptance check: TTA and ensembles give the same predictions through the torch and
    ONNX backends (to 1e-4), from one exported graph."""
    from meddx.inference import load_model
    from meddx.inference.onnx import export_onnx
    from meddx.modalities.loading import load_bundle
    from meddx.training import train
    from meddx.training.combine import join_packages

    cfg = tiny_breast_package.card.training["config"]
    # same seed, so the same split (and init); another learning rate, so other weights
    other = train({**cfg, "name": "breast-tiny-c", "train": {**cfg["train"], "lr": 0.01}},
                  out=tmp_path / "c", progress=False)
    assert (other.card.training_data["split_sha256"]
            == tiny_breast_package.card.training_data["split_sha256"])
    joined = join_packages([tiny_breast_package.path, other.path], tmp_path / "joined",
                           tta="flips")
    card = joined.card
    assert card.network["options"]["members"] == 2 and card.network["options"]["tta"] == "flips"
    assert card.calibration is not None and card.operating_points  # refit on calib
    assert [m["package_sha256"] for m in card.training["members"]] == [
        tiny_breast_package.sha256, other.sha256]
    report = export_onnx(joined)
    assert "model.onnx" in " ".join(report["files"])
    bundle = load_bundle(cfg)
    test = bundle.splits["test"]
    torch_predictor = load_model(joined.path, backend="torch")
    torch_predictor.bf16 = False  # fp32 against the fp32 graph
    torch_probs = torch_predictor.predict_split(test)[1]
    onnx_probs = load_model(joined.path, backend="onnx").predict_split(test)[1]
    np.testing.assert_allclose(onnx_probs, torch_probs, atol=1e-4)
    # and the joined output is the mean of the members' flipped logits, not member 1's
    single = load_model(tiny_breast_package.path, backend="torch").predict_split(test)[1]
    assert not np.allclose(single, torch_probs, atol=1e-3)


def test_tta_only_package_and_its_explanation(tiny_breast_package, tmp_path, breast_npz):
    from meddx.inference import load_model
    from meddx.training.combine import join_packages

    tta = join_packages([tiny_breast_package.path], tmp_path / "tta", tta="hflip")
    assert tta.card.name.endswith("-tta") and tta.card.network["options"]["tta"] == "hflip"
    predictor = load_model(tta.path, backend="torch")
    image = np.random.default_rng(0).integers(0, 255, (28, 28)).astype(np.uint8)
    pred = predictor.predict([image], explain=True)[0]
    assert pred.explanation is not None and pred.explanation.shape == (28, 28)
    # TTA removed again gives back the original network's outputs
    back = join_packages([tta.path], tmp_path / "back", tta="none")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(back.build_model()(x), tiny_breast_package.build_model()(x))


def test_tta_refused_for_models_trained_without_flips(tmp_path, breast_npz):
    from meddx.training import train

    with pytest.raises(ConfigError, match="augment.flips is off"):
        train({"name": "no-flips", "data": {"dataset": "breastmnist", "limit": 40},
               "model": {"name": "resnet18", "options": {"tta": "flips"}},
               "train": {"epochs": 1, "augment": {"flips": False}}},
              out=tmp_path / "r", progress=False)


def test_config_trained_image_ensemble_with_tta(tmp_path, breast_npz):
    """`model.options.members` + `tta` train K plain members and package them wrapped."""
    from meddx.inference import load_model
    from meddx.training import train

    package = train({"name": "ens", "seed": 0, "data": {"dataset": "breastmnist", "limit": 64},
                     "model": {"name": "resnet18", "options": {"members": 2, "tta": "hflip"}},
                     "train": {"epochs": 1, "batch_size": 32, "early_stopping_patience": None}},
                    out=tmp_path / "ens", progress=False)
    assert package.card.network["options"] == {"members": 2, "tta": "hflip"}
    assert len(package.card.training["members"]) == 2
    model = package.build_model()
    assert isinstance(model, FlipTTA) and isinstance(model.net, Ensemble)
    member = tmp_path / "ens" / "members" / "0" / "model"
    from meddx.package import load_package

    assert "tta" not in load_package(member).card.network["options"]  # trained plain
    assert load_model(package.path).card.calibration is not None
