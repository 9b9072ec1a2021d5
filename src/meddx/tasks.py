"""Task specifications: the label space, and from it the loss and output activation.

No network hard-codes its task: a model emits ``TaskSpec.num_outputs`` logits and
the task turns them into per-class probabilities and a loss.

* ``binary``: one logit, sigmoid; probability of ``positive_class``.
* ``multiclass``: K logits, softmax, cross-entropy.
* ``ordinal``: K-1 cumulative logits (P(y > k), CORAL-style), binary cross-entropy
  on the cumulative targets; class probabilities are differences of the cumulative ones.
* ``multilabel``: K logits, independent sigmoids, binary cross-entropy with missing
  labels (NaN) masked out.
* ``regression``: one output, mean squared error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, model_validator

from meddx.errors import ConfigError, DataError

__all__ = ["TaskKind", "TaskSpec"]

TaskKind = Literal["binary", "multiclass", "multilabel", "ordinal", "regression"]


class TaskSpec(BaseModel):
    """What is predicted.

    Args:
        kind: the task kind.
        class_names: one name per class (per label for multilabel; one name for regression).
            For binary tasks the order is the dataset's raw label order.
        positive_class: the class that counts as "disease" (binary: required).
        label_values: raw label values in the dataset, one per class, when they are not
            ``0..K-1`` (e.g. ``["N", "A", "O", "~"]``). Defaults to ``0..K-1``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: TaskKind
    class_names: list[str]
    positive_class: str | None = None
    label_values: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        n = len(self.class_names)
        if len(set(self.class_names)) != n:
            raise ValueError("class_names must be unique")
        if self.kind in ("binary",) and n != 2:
            raise ValueError(f"a binary task needs exactly 2 class names, got {n}")
        if self.kind in ("multiclass", "ordinal") and n < 2:
            raise ValueError(f"a {self.kind} task needs at least 2 classes")
        if self.kind == "binary" and self.positive_class is None:
            raise ValueError(
                "a binary task must name its positive class explicitly (positive_class)"
            )
        if self.positive_class is not None and self.positive_class not in self.class_names:
            raise ValueError(
                f"positive_class {self.positive_class!r} is not one of {self.class_names}"
            )
        if self.label_values is not None and len(self.label_values) != n:
            raise ValueError("label_values must have one value per class")
        return self

    # ------------------------------------------------------------------ shapes
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_outputs(self) -> int:
        """Width of the network's last layer."""
        if self.kind in ("binary", "regression"):
            return 1
        if self.kind == "ordinal":
            return self.num_classes - 1
        return self.num_classes

    @property
    def positive_index(self) -> int | None:
        if self.positive_class is None:
            return None
        return self.class_names.index(self.positive_class)

    @property
    def _binary_positive(self) -> int:
        """The positive class's index of a binary task (which always names one)."""
        pos = self.positive_index
        if pos is None:
            raise ConfigError("a binary task needs its positive class named")
        return pos

    # ----------------------------------------------------------------- labels
    def encode(self, raw: Any, sample_id: str | None = None) -> Any:
        """Map one raw label to the model's target encoding.

        Returns a class index (binary: 1 for the positive class, 0 otherwise; multiclass and
        ordinal: the class index), a float vector (multilabel; NaN = missing), or a float.

        Raises:
            DataError: the label is not one of the task's classes.
        """
        if self.kind == "regression":
            try:
                return float(raw)
            except (TypeError, ValueError) as e:
                raise DataError(f"label {raw!r} is not a number", sample_id=sample_id) from e
        if self.kind == "multilabel":
            vec = np.asarray(raw, dtype=np.float32).reshape(-1)
            if vec.size != self.num_classes:
                raise DataError(
                    f"multilabel target has {vec.size} values, task has {self.num_classes} labels",
                    sample_id=sample_id,
                )
            ok = np.isnan(vec) | (vec == 0) | (vec == 1)
            if not ok.all():
                raise DataError("multilabel targets must be 0, 1 or missing", sample_id=sample_id)
            return vec
        index = self._class_index(raw, sample_id)
        if self.kind == "binary":
            return int(index == self.positive_index)
        return index

    def _class_index(self, raw: Any, sample_id: str | None) -> int:
        values = self.label_values if self.label_values is not None else list(range(self.num_classes))
        if isinstance(raw, np.ndarray):
            raw = raw.reshape(-1)[0].item() if raw.size == 1 else raw
        if isinstance(raw, np.generic):
            raw = raw.item()
        for i, v in enumerate(values):
            if raw == v or (isinstance(raw, str) and str(v) == raw.strip()):
                return i
        if isinstance(raw, str) and raw in self.class_names:
            return self.class_names.index(raw)
        raise DataError(
            f"label {raw!r} is not one of the task's classes {values}",
            sample_id=sample_id,
            hint="fix the label or add the class to the task",
        )

    def decode(self, index: int) -> str:
        """Class name of a class index in probability order."""
        return self.class_names[index]

    # ----------------------------------------------------- probabilities & loss
    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-class probabilities (N, K) in ``class_names`` order (regression: the value)."""
        logits = logits.float()
        if self.kind == "binary":
            p = torch.sigmoid(logits.reshape(-1))
            out = torch.empty(p.shape[0], 2, dtype=p.dtype, device=p.device)
            pos = self._binary_positive
            out[:, pos] = p
            out[:, 1 - pos] = 1 - p
            return out
        if self.kind == "multiclass":
            return torch.softmax(logits, dim=1)
        if self.kind == "ordinal":
            cum = torch.sigmoid(logits)  # P(y > k)
            # enforce monotonicity so class probabilities are non-negative
            cum = torch.cummin(cum, dim=1).values
            ones = torch.ones_like(cum[:, :1])
            zeros = torch.zeros_like(cum[:, :1])
            upper = torch.cat([ones, cum], dim=1)
            lower = torch.cat([cum, zeros], dim=1)
            return (upper - lower).clamp_min(0)
        if self.kind == "multilabel":
            return torch.sigmoid(logits)
        return logits.reshape(-1, 1)

    def loss(
        self, logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Loss for a batch; ``class_weights`` (K,) re-weights classes (not for regression)."""
        logits = logits.float()
        fn = torch.nn.functional
        if self.kind == "multiclass":
            return fn.cross_entropy(logits, target.long(), weight=class_weights)
        if self.kind == "binary":
            t = target.float().reshape(-1)
            pos_weight = None
            if class_weights is not None:
                pos = self._binary_positive
                pos_weight = (class_weights[pos] / class_weights[1 - pos]).reshape(1)
            return fn.binary_cross_entropy_with_logits(logits.reshape(-1), t, pos_weight=pos_weight)
        if self.kind == "ordinal":
            t = target.long().reshape(-1, 1)
            ks = torch.arange(self.num_classes - 1, device=logits.device).reshape(1, -1)
            cum_t = (t > ks).float()
            w = None
            if class_weights is not None:
                w = class_weights[t.reshape(-1)].reshape(-1, 1).expand_as(cum_t)
            return fn.binary_cross_entropy_with_logits(logits, cum_t, weight=w)
        if self.kind == "multilabel":
            t = target.float()
            mask = ~torch.isnan(t)
            if not mask.any():
                return logits.sum() * 0.0
            per = fn.binary_cross_entropy_with_logits(
                logits, torch.nan_to_num(t, nan=0.0), reduction="none",
                pos_weight=class_weights,
            )
            return (per * mask).sum() / mask.sum()
        return fn.mse_loss(logits.reshape(-1), target.float().reshape(-1))

    def class_weights(self, targets: np.ndarray) -> np.ndarray:
        """Inverse-frequency weights from training targets (multilabel: neg/pos ratio)."""
        if self.kind == "regression":
            raise ConfigError("class weighting does not apply to regression tasks")
        if self.kind == "multilabel":
            t = np.asarray(targets, dtype=float)
            pos = np.nansum(t, axis=0)
            neg = np.nansum(1 - t, axis=0)
            return np.asarray(neg / np.maximum(pos, 1), dtype=np.float32)
        counts = np.bincount(np.asarray(targets, dtype=int).reshape(-1), minlength=2)
        if self.kind != "binary":
            counts = np.bincount(np.asarray(targets, dtype=int), minlength=self.num_classes)
            w = counts.sum() / np.maximum(counts, 1) / self.num_classes
            return np.asarray(w, dtype=np.float32)
        # binary targets are 0/1 (1 = positive); return weights in class_names order
        w01 = counts.sum() / np.maximum(counts, 1) / 2
        out = np.empty(2, dtype=np.float32)
        pos = self._binary_positive
        out[pos] = w01[1]
        out[1 - pos] = w01[0]
        return out

    def target_index(self, targets: np.ndarray) -> np.ndarray:
        """Encoded targets → class index in ``class_names`` order (binary/multiclass/ordinal)."""
        t = np.asarray(targets).astype(int).reshape(-1)
        if self.kind == "binary":
            pos = self._binary_positive
            return np.asarray(np.where(t == 1, pos, 1 - pos))
        return t

    def describe(self) -> str:
        extra = f", positive: {self.positive_class}" if self.positive_class else ""
        return f"{self.kind} ({', '.join(self.class_names)}{extra})"

    @classmethod
    def from_labels(
        cls, kind: TaskKind, labels: Sequence[Any], positive_class: str | None = None
    ) -> TaskSpec:
        """Build a task from the sorted unique raw labels of a dataset."""
        values = sorted({v for v in labels}, key=lambda v: (str(type(v)), v))
        try:
            return cls(
                kind=kind,
                class_names=[str(v) for v in values],
                label_values=values,
                positive_class=positive_class,
            )
        except ValueError as e:
            raise ConfigError(f"cannot build task from labels: {e}") from e
