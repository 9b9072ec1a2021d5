"""Contract tests over every registered model and every task kind (a new entry is covered
without writing a test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meddx.models import MODELS, build_network
from meddx.tasks import TaskSpec

TASKS = {
    "binary": TaskSpec(kind="binary", class_names=["neg", "pos"], positive_class="pos"),
    "multiclass": TaskSpec(kind="multiclass", class_names=["a", "b", "c"]),
    "ordinal": TaskSpec(kind="ordinal", class_names=["g0", "g1", "g2", "g3", "g4"]),
    "multilabel": TaskSpec(kind="multilabel", class_names=["x", "y", "z", "w"]),
    "regression": TaskSpec(kind="regression", class_names=["value"]),
}


def _targets(task: TaskSpec, n: int) -> torch.Tensor:
    if task.kind == "multilabel":
        t = torch.randint(0, 2, (n, task.num_classes)).float()
        t[0, 0] = float("nan")  # a missing label must be masked, not break the loss
        return t
    if task.kind == "regression":
        return torch.randn(n)
    if task.kind == "binary":
        return torch.tensor([0, 1] * (n // 2) + [1] * (n % 2))
    return torch.arange(n) % task.num_classes


@pytest.mark.parametrize("kind", list(TASKS))
def test_task_loss_and_activation_shapes(kind: str) -> None:
    task = TASKS[kind]
    logits = torch.randn(6, task.num_outputs, requires_grad=True)
    probs = task.probabilities(logits)
    width = 1 if kind == "regression" else task.num_classes
    assert probs.shape == (6, width)
    if kind in ("binary", "multiclass", "ordinal"):
        assert torch.allclose(probs.sum(1), torch.ones(6), atol=1e-5)
        assert (probs >= 0).all()
    loss = task.loss(logits, _targets(task, 6))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_forward_backward_every_task(name: str) -> None:
    builder = MODELS.get(name)
    spec = dict(builder.example_spec)
    kinds = ["binary", "multiclass", "ordinal", "multilabel"]
    for kind in kinds:
        task = TASKS[kind]
        torch.manual_seed(0)
        model = build_network(name, num_outputs=task.num_outputs, spec=spec)
        model.train()
        x = builder.example_input(spec, 3)
        logits = model(x)
        assert logits.shape == (3, task.num_outputs), f"{name}/{kind}"
        probs = task.probabilities(logits)
        assert probs.shape == (3, task.num_classes)
        task.loss(logits, _targets(task, 3)).backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{name}/{kind}: no grad"


def test_binary_task_keeps_positive_class_explicit() -> None:
    # BreastMNIST: label 0 is malignant, the positive class
    task = TaskSpec(kind="binary", class_names=["malignant", "normal, benign"],
                    positive_class="malignant")
    assert task.encode(0) == 1 and task.encode(1) == 0
    probs = task.probabilities(torch.tensor([[5.0]]))
    assert probs[0, 0] > 0.99  # column of "malignant"
    np.testing.assert_array_equal(task.target_index(np.array([1, 0])), [0, 1])


def test_binary_task_without_positive_class_is_refused() -> None:
    with pytest.raises(ValueError, match="positive class"):
        TaskSpec(kind="binary", class_names=["a", "b"])


def test_ordinal_probabilities_follow_cumulative_logits() -> None:
    task = TASKS["ordinal"]
    very_high = torch.full((1, 4), 20.0)  # P(y > k) ≈ 1 for all k → grade 4
    assert task.probabilities(very_high).argmax().item() == 4
    very_low = torch.full((1, 4), -20.0)
    assert task.probabilities(very_low).argmax().item() == 0
