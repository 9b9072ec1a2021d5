"""Training end to end on a BreastMNIST slice: run folder, package, predictor, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from meddx.errors import ConfigError, DataError
from meddx.inference import load_model

pytestmark = pytest.mark.slow


def test_run_folder_and_card(tiny_breast_package) -> None:
    pkg = tiny_breast_package
    run = pkg.path.parent
    for name in ("config.yaml", "splits.json", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (run / name).exists(), name
    assert list(run.glob("logs/version_*/metrics.csv"))
    splits = json.loads((run / "splits.json").read_text())
    assert set(splits) == {"train", "val", "calib", "test"}
    assert not set(splits["train"]["ids"]) & set(splits["calib"]["ids"])
    card = pkg.card
    assert card.task.positive_class == "malignant"
    assert card.training["selected_on"] == "val"
    assert card.preprocessing["size"] == 28
    assert card.training_data["dataset"] == "breastmnist"
    assert "CC BY" in card.license


def test_predictor_on_arrays_matches_probability_contract(tiny_breast_package, breast_npz) -> None:
    predictor = load_model(tiny_breast_package.path, backend="torch")
    images = np.load(breast_npz)["test_images"][:4]
    preds = predictor.predict(list(images))
    assert len(preds) == 4
    for p in preds:
        assert set(p.probabilities) == {"malignant", "normal, benign"}
        assert abs(sum(p.probabilities.values()) - 1) < 1e-5
        assert p.model["sha256"] == tiny_breast_package.sha256
        d = p.to_dict()
        json.dumps(d)
    # same input, same answer (eval mode, no dropout/augmentation at prediction)
    again = predictor.predict([images[0]])[0]
    assert again.probabilities == pytest.approx(preds[0].probabilities, abs=1e-6)


def test_predict_split_covers_every_sample(tiny_breast_package) -> None:
    from meddx.training import load_bundle

    bundle = load_bundle({"data": {"dataset": "breastmnist", "limit": 40}})
    predictor = load_model(tiny_breast_package.path)
    logits, probs = predictor.predict_split(bundle.splits["test"])
    assert logits.shape == (40, 1) and probs.shape == (40, 2)


def test_resume_continues_from_last_checkpoint(tmp_path: Path, breast_npz) -> None:
    from meddx.training import train

    cfg = {"name": "r", "data": {"dataset": "breastmnist", "limit": 48},
           "train": {"epochs": 1, "batch_size": 16}}
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(cfg, out=tmp_path, progress=False, resume=True, post_hoc=False)
    train(cfg, out=tmp_path, progress=False, post_hoc=False)
    cfg["train"]["epochs"] = 2
    pkg = train(cfg, out=tmp_path, progress=False, resume=True, post_hoc=False)
    assert pkg.card.training["epochs_run"] == 2


def test_init_weights_from_safetensors(tmp_path: Path, tiny_breast_package) -> None:
    from meddx.training import train

    cfg = {"name": "ft", "data": {"dataset": "breastmnist", "limit": 32},
           "model": {"name": "resnet18",
                     "init_weights": str(tiny_breast_package.path / "weights.safetensors")},
           "train": {"epochs": 1, "batch_size": 16}}
    assert train(cfg, out=tmp_path, progress=False, post_hoc=False).path.exists()
    bad = dict(cfg, model={"name": "resnet18", "init_weights": str(tmp_path / "w.pt")})
    with pytest.raises(ConfigError, match="safetensors"):
        train(bad, out=tmp_path / "b", progress=False, post_hoc=False)


def test_unknown_dataset_and_bad_split_name() -> None:
    from meddx.training import load_bundle

    with pytest.raises(ConfigError, match="did you mean 'breastmnist'"):
        load_bundle({"data": {"dataset": "breastmnis"}})
    bundle = load_bundle({"data": {"dataset": "breastmnist", "limit": 20}})
    with pytest.raises(DataError, match="no split 'holdout'"):
        bundle.split("holdout")


def test_new_run_in_old_folder_never_reuses_old_weights(tmp_path: Path, breast_npz) -> None:
    from meddx.training import train

    cfg = {"name": "a", "data": {"dataset": "breastmnist", "limit": 32},
           "train": {"epochs": 1, "batch_size": 16}}
    first = train(cfg, out=tmp_path, progress=False, post_hoc=False)
    cfg["seed"] = 7
    second = train(cfg, out=tmp_path, progress=False, post_hoc=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")) == ["best.ckpt",
                                                                                  "last.ckpt"]
    assert first.sha256 != second.sha256


def test_non_finite_loss_skips_the_step_and_divergence_is_an_error() -> None:
    import torch

    from meddx.config import TrainConfig
    from meddx.errors import ModelError
    from meddx.tasks import TaskSpec
    from meddx.training.module import MAX_BAD_STEPS, MeddxModule

    task = TaskSpec(kind="binary", class_names=["n", "p"], positive_class="p")
    module = MeddxModule(torch.nn.Linear(2, 1), task, TrainConfig())
    module.log = lambda *a, **k: None  # not attached to a Trainer here
    bad = (torch.tensor([[float("nan"), 0.0]]), torch.tensor([1]))
    assert module.training_step(bad, 0) is None
    good = (torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    assert torch.isfinite(module.training_step(good, 1))
    with pytest.raises(ModelError, match="diverged"):
        for i in range(MAX_BAD_STEPS):
            module.training_step(bad, i)


@pytest.mark.parametrize("optimizer, bad", [("sgd", float("inf")), ("adamw", float("nan"))])
def test_non_finite_gradients_never_reach_the_weights(optimizer: str, bad: float) -> None:
    """The bad update leaves every weight exactly as it was — with AdamW too, whose momentum
    (built up by one good step first) and weight decay would move weights on a zero gradient."""
    import torch

    from meddx.config import TrainConfig
    from meddx.tasks import TaskSpec
    from meddx.training.module import MeddxModule

    task = TaskSpec(kind="binary", class_names=["n", "p"], positive_class="p")
    net = torch.nn.Linear(2, 1)
    module = MeddxModule(net, task, TrainConfig())
    opt = (torch.optim.SGD(net.parameters(), lr=0.1) if optimizer == "sgd" else
           torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.1))
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # a good step first
    before = [p.detach().clone() for p in net.parameters()]
    net.weight.grad = torch.full_like(net.weight, bad)
    net.bias.grad = torch.ones_like(net.bias)
    module.on_before_optimizer_step(opt)
    opt.step()
    for p, b in zip(net.parameters(), before, strict=True):
        assert torch.isfinite(p).all() and torch.equal(p, b)


def test_bf16_is_kept_only_where_the_cpu_computes_it() -> None:
    # without oneDNN bf16 kernels (no AVX-512) every bf16 convolution runs PyTorch's reference
    # path, 12-17x slower than fp32 (measured): such a CPU trains in fp32 and says so
    import torch

    from meddx.training import train_precision

    assert train_precision("32") == "32"
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert train_precision("bf16-mixed") == ("bf16-mixed" if native else "32")
