"""Shared by the evaluation and reporting tests: one evaluation of the tiny BreastMNIST package,
run once per session on a private copy (the package fixture is shared with other areas)."""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


@functools.lru_cache(maxsize=4)
def evaluated(package_dir: str) -> Any:
    """``evaluate()`` of a copy of the package at ``package_dir``, with report, 300 resamples."""
    from meddx.evaluation import evaluate

    root = Path(tempfile.mkdtemp(prefix="meddx-eval-"))
    model = root / "model"
    shutil.copytree(package_dir, model)
    return evaluate(model, out=root / "eval", bootstrap=300, seed=0)


def untrained_package(config: dict[str, Any], out: Path) -> tuple[Any, Any]:
    """A package of a small untrained ResNet-18 (width 1/4) for ``config``'s dataset, and the
    DataBundle it was built on: the evaluation machinery, without waiting for training."""
    import torch

    from meddx.config import parse_config
    from meddx.modalities import get_modality
    from meddx.models import build_network
    from meddx.package import ModelCard, save_package
    from meddx.training import load_bundle

    cfg = parse_config({"model": {"name": "resnet18", "options": {"widen_factor": 0.25}},
                        **config})
    bundle = load_bundle(cfg)
    spec = get_modality(bundle.modality).network_spec(bundle.input_spec)
    torch.manual_seed(cfg.seed)
    net = build_network("resnet18", num_outputs=bundle.task.num_outputs, spec=spec,
                        options=dict(cfg.model.options))
    card = ModelCard(name=cfg.name, modality=bundle.modality, task=bundle.task,
                     network={"name": "resnet18", "options": dict(cfg.model.options)},
                     preprocessing=bundle.input_spec,
                     training_data={"dataset": bundle.dataset, **bundle.summary()},
                     training={"config": cfg.model_dump(mode="json"), "seed": cfg.seed})
    return save_package(out, net, card), bundle
