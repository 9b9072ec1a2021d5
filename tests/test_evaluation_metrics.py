"""Known answers: meddx's metrics equal scikit-learn's, and the vectorised bootstrap engine
equals the point estimates under unit weights."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from meddx.errors import EvaluationError
from meddx.statistics.metrics import compute_metrics
from meddx.statistics.weighted import weighted_metrics
from meddx.tasks import TaskSpec

BINARY = TaskSpec(kind="binary", class_names=["malignant", "benign"], positive_class="malignant")
MULTI = TaskSpec(kind="multiclass", class_names=["mel", "sk", "nevus"], positive_class="mel")
ORDINAL = TaskSpec(kind="ordinal", class_names=["0", "1", "2", "3", "4"])
MULTILABEL = TaskSpec(kind="multilabel", class_names=["a", "b", "c"])
REGRESSION = TaskSpec(kind="regression", class_names=["value"])


def _binary_data(n=200, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p_pos = np.clip(0.3 * y + rng.uniform(0, 0.7, n), 0, 1).round(2)  # ties on purpose
    probs = np.empty((n, 2))
    probs[:, 0], probs[:, 1] = p_pos, 1 - p_pos  # positive class is column 0
    return y, probs


def _multi_data(n=300, k=3, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs


def test_binary_metrics_equal_sklearn():
    y, probs = _binary_data()
    m = compute_metrics(BINARY, y, probs, threshold=0.4)
    p = probs[:, 0]
    pred = (p >= 0.4).astype(int)
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["auroc[benign]"] == pytest.approx(skm.roc_auc_score(1 - y, probs[:, 1]))
    assert m["auprc"] == pytest.approx(skm.average_precision_score(y, p))
    assert m["auprc[benign]"] == pytest.approx(skm.average_precision_score(1 - y, probs[:, 1]))
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["ppv"] == pytest.approx(tp / (tp + fp))
    assert m["npv"] == pytest.approx(tn / (tn + fn))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["brier"] == pytest.approx(skm.brier_score_loss(y, p))


def test_multiclass_and_ordinal_equal_sklearn():
    y, probs = _multi_data()
    m = compute_metrics(MULTI, y, probs, threshold=0.3)
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, probs.argmax(1)))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, probs.argmax(1)))
    assert m["brier"] == pytest.approx(((probs - np.eye(3)[y]) ** 2).sum(1).mean())
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y == 0, probs[:, 0] >= 0.3))
    y5, p5 = _multi_data(n=400, k=5, seed=3)
    o = compute_metrics(ORDINAL, y5, p5)
    pred = p5.argmax(1)
    assert o["qwk"] == pytest.approx(skm.cohen_kappa_score(y5, pred, weights="quadratic"))
    assert o["mae_grade"] == pytest.approx(np.abs(pred - y5).mean())
    assert "sensitivity" not in o  # no positive class named


def test_multilabel_per_label_and_macro_with_missing():
    rng = np.random.default_rng(2)
    t = rng.integers(0, 2, (150, 3)).astype(float)
    probs = np.clip(0.4 * t + rng.uniform(0, 0.6, t.shape), 0, 1)
    t[rng.random(t.shape) < 0.2] = np.nan
    m = compute_metrics(MULTILABEL, t, probs)
    per = []
    for j, name in enumerate("abc"):
        known = ~np.isnan(t[:, j])
        a = skm.roc_auc_score(t[known, j], probs[known, j])
        assert m[f"auroc[{name}]"] == pytest.approx(a)
        assert m[f"sensitivity[{name}]"] == pytest.approx(
            skm.recall_score(t[known, j], probs[known, j] >= 0.5))
        per.append(a)
    assert m["auroc"] == pytest.approx(np.mean(per))


def test_degenerate_inputs_give_nan_and_a_note_not_a_crash():
    y = np.ones(10, dtype=int)
    probs = np.column_stack([np.linspace(0, 1, 10), 1 - np.linspace(0, 1, 10)])
    m = compute_metrics(BINARY, y, probs)
    assert np.isnan(m["auroc"]) and np.isnan(m["specificity"])
    assert any("auroc" in n for n in m.notes)
    assert m["sensitivity"] == pytest.approx(0.5)
    # a class never seen in a multiclass sample
    y3, p3 = _multi_data(n=60)
    y3[y3 == 2] = 1
    m3 = compute_metrics(MULTI, y3, p3)
    assert np.isnan(m3["auroc[nevus]"]) and np.isfinite(m3["auroc"])
    with pytest.raises(EvaluationError):
        compute_metrics(BINARY, y, probs[:5])


@pytest.mark.parametrize("task", [BINARY, MULTI, ORDINAL, MULTILABEL, REGRESSION],
                         ids=lambda t: t.kind)
def test_weighted_engine_equals_point_estimates(task):
    rng = np.random.default_rng(4)
    if task.kind == "binary":
        t, p = _binary_data()
    elif task.kind == "multilabel":
        t = rng.integers(0, 2, (120, 3)).astype(float)
        p = np.clip(0.4 * t + rng.uniform(0, 0.6, t.shape), 0, 1).round(2)
        t[rng.random(t.shape) < 0.15] = np.nan
    elif task.kind == "regression":
        t = rng.normal(size=80)
        p = (t + rng.normal(scale=0.5, size=80)).reshape(-1, 1)
    else:
        t, p = _multi_data(n=250, k=task.num_classes)
    point = compute_metrics(task, t, p, threshold=0.45 if task.kind != "regression" else None)
    w = weighted_metrics(task, t, p, np.ones((1, len(t))), 0.45)
    assert set(point) == set(w)
    for key, value in point.items():
        assert w[key][0] == pytest.approx(value, nan_ok=True, abs=1e-9), key
    # integer weights equal repeating cases
    reps = rng.integers(0, 3, len(t))
    idx = np.repeat(np.arange(len(t)), reps)
    rep = compute_metrics(task, np.asarray(t)[idx], np.asarray(p)[idx], 0.45)
    ww = weighted_metrics(task, t, p, reps[None].astype(float), 0.45)
    for key, value in rep.items():
        assert ww[key][0] == pytest.approx(value, nan_ok=True, abs=1e-9), key
