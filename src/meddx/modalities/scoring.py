"""The score an attribution explains: one class's probability, from logits and the task.

Explainers get the network and the package's ``preprocessing`` (input_spec), which records the
task kind and the positive class index for the modalities' explainers; a :class:`TaskSpec`
passed explicitly wins.
"""

from __future__ import annotations

from typing import Any

import torch

from meddx.errors import ConfigError

__all__ = ["class_score", "top_class"]


def class_score(logits: torch.Tensor, class_index: int, input_spec: dict[str, Any],
                task: Any | None = None) -> torch.Tensor:
    """Probability of class ``class_index`` for each row of ``logits`` (N, K) → (N,).

    Binary tasks have one logit: the probability of the positive class, or its complement when
    ``class_index`` names the other class. Multilabel: that label's sigmoid. Otherwise softmax.
    """
    logits = logits.float()
    if task is not None:
        return task.probabilities(logits)[:, class_index]
    kind = input_spec.get("task_kind")
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits[:, 0])
        positive = input_spec.get("positive_index")
        return 1 - p if positive is not None and class_index != positive else p
    if not 0 <= class_index < logits.shape[1]:
        raise ConfigError(f"class index {class_index} is out of range for "
                          f"{logits.shape[1]} outputs")
    if kind == "multilabel":
        return torch.sigmoid(logits[:, class_index])
    if kind == "ordinal":
        raise ConfigError("explaining an ordinal model needs its TaskSpec (task=…)")
    return torch.softmax(logits, dim=1)[:, class_index]


def top_class(logits: torch.Tensor, input_spec: dict[str, Any], task: Any | None = None) -> int:
    """Index (``class_names`` order) of the most probable class of the first row."""
    logits = logits.float()
    if task is not None:
        return int(task.probabilities(logits)[0].argmax())
    if logits.shape[1] == 1:
        positive = input_spec.get("positive_index")
        positive = 1 if positive is None else int(positive)
        return positive if float(torch.sigmoid(logits[0, 0])) >= 0.5 else 1 - positive
    return int(logits[0].argmax())
