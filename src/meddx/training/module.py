"""The LightningModule: any registered network, any task; loss and activation from the TaskSpec."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import numpy as np
import torch

from meddx.config import TrainConfig
from meddx.errors import ModelError
from meddx.tasks import TaskSpec

__all__ = ["MeddxModule", "selection_score"]

logger = logging.getLogger(__name__)

MAX_BAD_STEPS = 10  # consecutive non-finite losses before training is declared diverged


def selection_score(task: TaskSpec, targets: np.ndarray, probs: np.ndarray) -> float:
    """The validation figure that chooses the model: AUROC (macro one-vs-rest; multilabel mean
    over labels with both classes present), accuracy when AUROC is undefined, -MSE for regression."""
    from sklearn.metrics import roc_auc_score

    if task.kind == "regression":
        return -float(np.mean((probs[:, 0] - targets) ** 2))
    try:
        if task.kind == "multilabel":
            aucs = []
            for j in range(targets.shape[1]):
                known = ~np.isnan(targets[:, j])
                yj = targets[known, j]
                if len(np.unique(yj)) == 2:
                    aucs.append(roc_auc_score(yj, probs[known, j]))
            return float(np.mean(aucs)) if aucs else float("nan")
        y = task.target_index(targets)
        if task.kind == "binary":
            pos = task.positive_index
            return float(roc_auc_score(y == pos, probs[:, pos]))
        present = np.unique(y)
        if len(present) == task.num_classes:
            return float(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
        return float(np.mean(probs.argmax(1) == y))
    except ValueError:
        return float("nan")


class MeddxModule(L.LightningModule):
    """Wraps a network for training: task loss, optimiser and schedule from the config."""

    def __init__(self, model: torch.nn.Module, task: TaskSpec, cfg: TrainConfig,
                 class_weights: np.ndarray | None = None, channels_last: bool = False,
                 batch_augment: Any = None) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.cfg = cfg
        self.channels_last = channels_last
        self.batch_augment = batch_augment
        w = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", w, persistent=False)
        self._bad_steps = 0
        self._val_logits: list[torch.Tensor] = []
        self._val_targets: list[torch.Tensor] = []

    def forward(self, x: Any) -> torch.Tensor:
        if self.channels_last and isinstance(x, torch.Tensor):
            if x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            elif x.ndim == 5:
                x = x.contiguous(memory_format=torch.channels_last_3d)
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        if self.batch_augment is not None:
            x = self.batch_augment(x)
        loss = self.task.loss(self(x), y, self.class_weights)
        if not torch.isfinite(loss):
            # skip the step rather than let one bad batch turn every weight into NaN
            self._bad_steps += 1
            logger.warning("non-finite training loss at epoch %d step %d: step skipped",
                           self.current_epoch, batch_idx)
            if self._bad_steps >= MAX_BAD_STEPS:
                raise ModelError(
                    f"training diverged: {self._bad_steps} steps with a non-finite loss",
                    hint="lower train.lr, or train with train.precision: '32'")
            return None
        self._bad_steps = 0
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True,
                 batch_size=len(y))
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """A finite loss can still give non-finite gradients (bf16 overflow): drop that update
        instead of letting it write NaN into every weight. The gradients are removed, not
        zeroed: optimizers skip parameters without a gradient, whereas a zero gradient would
        still move them by momentum and weight decay."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return
        # one fused norm: inf or NaN in any gradient makes it non-finite
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if not torch.isfinite(norm):
            self._bad_steps += 1
            logger.warning("non-finite gradients at epoch %d: update skipped", self.current_epoch)
            for p in params:
                p.grad = None
            if self._bad_steps >= MAX_BAD_STEPS:
                raise ModelError(
                    f"training diverged: {self._bad_steps} steps with non-finite gradients",
                    hint="lower train.lr, or train with train.precision: '32'")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x).float()
        loss = self.task.loss(logits, y, self.class_weights)
        self.log("val_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(y),
                 sync_dist=True)
        self._val_logits.append(logits.detach().cpu())
        self._val_targets.append(y.detach().cpu())

    def on_validation_epoch_end(self) -> None:
        if not self._val_logits:
            return
        logits = torch.cat(self._val_logits)
        targets = torch.cat(self._val_targets)
        self._val_logits.clear()
        self._val_targets.clear()
        if self.trainer.world_size > 1:
            # under DDP each process holds a shard of val (its sampler pads the shards to one
            # length): the score is the whole split's, not the mean of the shards' AUROCs
            logits = self.all_gather(logits).flatten(0, 1).cpu()
            targets = self.all_gather(targets).flatten(0, 1).cpu()
        targets = targets.numpy()
        probs = self.task.probabilities(logits).numpy()
        score = selection_score(self.task, targets, probs)
        if np.isnan(score):
            score = -float(self.task.loss(logits, torch.as_tensor(targets)).item())
        self.log("val_auroc", score, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> Any:
        cfg = self.cfg
        params = self.model.parameters()
        if cfg.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay,
                                  nesterov=True)
        else:
            opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if cfg.scheduler == "none":
            return opt
        if cfg.scheduler == "multistep":
            miles = [max(1, int(m * cfg.epochs)) if m < 1 else int(m) for m in cfg.milestones]
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=miles, gamma=0.1)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        if cfg.scheduler == "onecycle":
            steps = int(self.trainer.estimated_stepping_batches)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
