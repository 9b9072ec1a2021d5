"""Self-supervised pretraining (SimCLR) of a config's network on its unlabelled images.

No ImageNet weights are downloaded here; the offline alternative is contrastive pretraining
on the project's own images (Chen et al. 2020, "A Simple Framework for Contrastive Learning
of Visual Representations"): every image gives two random views (the modality's
:meth:`~meddx.modalities.base.Modality.contrastive_views`), the network without its
classification layer maps them to features, a 2-layer MLP projects those, and the NT-Xent
loss pulls the two views of an image together and pushes the other images of the batch away.
Labels are never read.

The result is a ``.safetensors`` file holding the backbone's weights under exactly the names
the training network uses, without the classification layer, so that
``meddx train CONFIG --init-weights FILE`` loads every backbone tensor and starts a fresh
head. The header's metadata and a ``<file>.json`` sidecar record what was done.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from meddx.config import ExperimentConfig
from meddx.errors import ConfigError, DataError, ModelError
from meddx.modalities import DataBundle, get_modality
from meddx.modalities.base import SPLIT_NAMES
from meddx.modalities.loading import as_config, load_bundle
from meddx.version import __version__

__all__ = ["PretrainReport", "pretrain", "nt_xent", "SimCLRNet", "backbone_of"]

logger = logging.getLogger(__name__)

MAX_BAD_STEPS = 10


@dataclass
class PretrainReport:
    """What :func:`pretrain` wrote and measured.

    Attributes:
        path: the ``.safetensors`` file (backbone weights).
        sidecar: the ``<path>.json`` sidecar (metadata + per-epoch loss).
        metadata: what the file's header records.
        epoch_losses: mean NT-Xent loss per epoch.
    """

    path: Path
    sidecar: Path
    metadata: dict[str, Any]
    epoch_losses: list[float] = field(default_factory=list)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised temperature-scaled cross-entropy over a batch of view pairs.

    ``z1[i]`` and ``z2[i]`` are projections of two views of image ``i``; each of the ``2N``
    views must pick its partner among the other ``2N - 1`` by cosine similarity.
    """
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, partner)


def backbone_of(model: torch.nn.Module, num_outputs: int) -> tuple[str, int]:
    """Replace the network's classification layer by an identity, in place.

    Returns:
        The layer's name (its ``.weight``/``.bias`` are what fine-tuning starts fresh) and the
        width of the features that fed it.
    """
    from meddx.inference.ood import head_layer

    head = head_layer(model, num_outputs)
    if head is None:
        raise ConfigError(f"the network has no final linear layer with {num_outputs} outputs "
                          "to take off for pretraining",
                          hint="pretraining needs a network ending in nn.Linear (resnet18, "
                          "resnet34, resnet50, densenet121, efficientnet_b0)")
    name, layer = head
    model.set_submodule(name, torch.nn.Identity())
    return name, layer.in_features


class SimCLRNet(torch.nn.Module):
    """Backbone (the network without its head) followed by a 2-layer MLP projection."""

    def __init__(self, backbone: torch.nn.Module, features: int, proj_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = torch.nn.Sequential(
            torch.nn.Linear(features, features), torch.nn.ReLU(inplace=True),
            torch.nn.Linear(features, proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def pretrain(config: ExperimentConfig | str | Path | dict, *, out: str | Path,
             splits: tuple[str, ...] | list[str] = ("train",), epochs: int = 100,
             batch_size: int = 128, lr: float = 1e-3, temperature: float = 0.2,
             proj_dim: int = 128, weight_decay: float = 1e-5, max_minutes: float | None = None,
             threads: int | None = None, progress: bool = True, seed: int | None = None,
             bundle: DataBundle | None = None) -> PretrainReport:
    """Pretrain the config's network with SimCLR on the images of ``splits`` and write its
    backbone weights to ``out`` (``.safetensors``) and ``<out>.json``.

    Args:
        config: recipe YAML path, config object or dict; its data, network and precision are
            used, its labels and training settings are not.
        out: the ``.safetensors`` file to write.
        splits: which splits' images to use (default train only: pretraining on test images,
            even without labels, is transductive and must be chosen explicitly).
        epochs: passes over the images (cosine learning rate, linear warm-up).
        batch_size: images per step (each gives two views; at least 2).
        lr: peak AdamW learning rate.
        temperature: NT-Xent temperature.
        proj_dim: output width of the projection head.
        weight_decay: AdamW weight decay.
        max_minutes: stop after this long (the file is still written).
        threads: CPU threads (default: the config's ``train.threads``, else torch's).
        progress: show a progress bar with the loss.
        seed: random seed (default: the config's; it also carves calib from train).
        bundle: the data already loaded for this config.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"pretrained weights are written as .safetensors, got '{out.name}'",
                          hint="e.g. --out runs/pretrain/breastmnist.safetensors")
    if batch_size < 2:
        raise ConfigError("contrastive pretraining needs a batch size of at least 2 "
                          "(the other images of a batch are the negatives)")
    unknown = [s for s in splits if s not in SPLIT_NAMES]
    if unknown or not splits:
        raise ConfigError(f"unknown split(s) {unknown or splits}; choose from "
                          f"{', '.join(SPLIT_NAMES)}")
    cfg = as_config(config)
    if seed is not None:
        cfg = cfg.updated(seed=seed)
    _check_modality(cfg)
    threads = threads or cfg.train.threads
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    bundle = bundle or load_bundle(cfg)
    views = get_modality(bundle.modality).contrastive_views(bundle.input_spec)
    loader, n_images = _loader(bundle, splits, batch_size, cfg.seed)
    # one plain network: an ensemble's members and test-time flips are not pretrained
    from meddx.models.combine import plain_options
    from meddx.training import build_model_for

    plain = plain_options(cfg.model.options)
    model, net_name, net_options = build_model_for(cfg.updated(**{"model.options": plain}),
                                                   bundle)
    head_name, width = backbone_of(model, bundle.task.num_outputs)
    net = SimCLRNet(model, width, proj_dim)
    fmt = _memory_format(model, bundle.input_spec)
    if fmt is not None:
        net = net.to(memory_format=fmt)
    from meddx.training import train_precision

    bf16 = train_precision(cfg.train.precision) == "bf16-mixed"
    start = time.perf_counter()
    losses = _fit(net, loader, views, epochs=epochs, lr=lr, weight_decay=weight_decay,
                  temperature=temperature, bf16=bf16, fmt=fmt, progress=progress,
                  deadline=start + max_minutes * 60 if max_minutes else None)
    seconds = time.perf_counter() - start
    meta = {
        "kind": "simclr-backbone", "network": net_name, "network_options": net_options,
        "head_removed": head_name, "dataset": bundle.dataset, "modality": bundle.modality,
        "input_spec": bundle.input_spec, "splits": list(splits), "n_images": n_images,
        "epochs": epochs, "epochs_run": len(losses), "batch_size": loader.batch_size,
        "lr": lr, "weight_decay": weight_decay, "temperature": temperature,
        "proj_dim": proj_dim, "precision": "bf16-mixed" if bf16 else "32", "seed": cfg.seed,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None, "seconds": round(seconds, 1),
        "threads": torch.get_num_threads(), "meddx_version": __version__,
    }
    sidecar = _save(model, out, meta, losses)
    logger.info("pretrained %s on %d images for %d epochs (loss %.3f → %.3f, %.0f s): %s",
                net_name, n_images, len(losses), losses[0] if losses else float("nan"),
                losses[-1] if losses else float("nan"), seconds, out)
    return PretrainReport(path=out, sidecar=sidecar, metadata=meta, epoch_losses=losses)


def _check_modality(cfg: ExperimentConfig) -> None:
    """Refuse a modality without contrastive views before its data is read."""
    from meddx.catalog import get_entry

    entry = get_entry(cfg.data.dataset) if cfg.data.dataset else None
    name = cfg.data.modality or (entry.modality if entry else None)
    if name is not None:
        get_modality(name).contrastive_views(None)


def _loader(bundle: DataBundle, splits: tuple[str, ...] | list[str], batch_size: int,
            seed: int) -> tuple[Any, int]:
    from torch.utils.data import ConcatDataset, DataLoader

    from meddx.modalities.base import SplitDataset

    modality = get_modality(bundle.modality)
    parts = [SplitDataset(modality, bundle.split(s), bundle.input_spec, None) for s in splits]
    data = ConcatDataset(parts)
    n = len(data)
    if n < 2:
        raise DataError(f"pretraining needs images: splits {', '.join(splits)} of "
                        f"'{bundle.dataset}' hold {n}")
    batch = min(batch_size, n)
    loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True,
                        collate_fn=modality.collate,
                        generator=torch.Generator().manual_seed(seed))
    return loader, n


def _memory_format(model: torch.nn.Module, spec: dict[str, Any]) -> torch.memory_format | None:
    conv = any(isinstance(m, torch.nn.Conv2d | torch.nn.Conv3d) for m in model.modules())
    if not conv:
        return None
    return {2: torch.channels_last, 3: torch.channels_last_3d}.get(spec.get("spatial_dims"))


def _fit(net: SimCLRNet, loader: Any, views: Any, *, epochs: int, lr: float,
         weight_decay: float, temperature: float, bf16: bool, fmt: Any, progress: bool,
         deadline: float | None) -> list[float]:
    """The training loop; returns the mean loss of every epoch run."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    total = epochs * len(loader)
    warmup = min(10 * len(loader), max(1, total // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    net.train()
    losses: list[float] = []
    bad = 0
    bar = tqdm(total=total, disable=not progress, unit="step", desc="pretrain")
    try:
        for epoch in range(epochs):
            running, steps = 0.0, 0
            for x, _ in loader:
                v1, v2 = views(x)
                if fmt is not None:
                    v1, v2 = v1.contiguous(memory_format=fmt), v2.contiguous(memory_format=fmt)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    z = net(torch.cat([v1, v2]))
                z1, z2 = z.float().chunk(2)
                loss = nt_xent(z1, z2, temperature)
                if not torch.isfinite(loss):
                    bad += 1
                    logger.warning("non-finite pretraining loss at epoch %d: step skipped",
                                   epoch + 1)
                    if bad >= MAX_BAD_STEPS:
                        raise ModelError("pretraining diverged: non-finite losses",
                                         hint="lower --lr, or set train.precision: '32'")
                    opt.zero_grad(set_to_none=True)
                    sched.step()
                    continue
                bad = 0
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                value = loss.item()
                running += value
                steps += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{value:.3f}")
                if deadline is not None and time.perf_counter() > deadline:
                    break
            if steps:
                losses.append(running / steps)
                logger.info("pretrain epoch %d/%d: loss %.4f", epoch + 1, epochs, losses[-1])
            if deadline is not None and time.perf_counter() > deadline:
                logger.info("pretraining stopped at the time limit after %d epoch(s)",
                            len(losses))
                break
    finally:
        bar.close()
    return losses


def _save(backbone: torch.nn.Module, out: Path, meta: dict[str, Any],
          losses: list[float]) -> Path:
    from safetensors.torch import save_file

    state = {k: v.detach().to(memory_format=torch.contiguous_format).contiguous().clone()
             for k, v in backbone.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    save_file(state, str(out), metadata={"format": "pt", **header})
    sidecar = out.with_name(out.name + ".json")
    sidecar.write_text(json.dumps({**meta, "epoch_losses": [round(x, 5) for x in losses],
                                   "tensors": len(state)}, indent=2))
    return sidecar
