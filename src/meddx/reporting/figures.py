"""Matplotlib figures for the report, returned as base64 PNG (Agg backend, no display)."""

from __future__ import annotations

import base64
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from meddx.statistics.metrics import binary_view  # noqa: E402
from meddx.tasks import TaskSpec  # noqa: E402

__all__ = ["roc_pr_figure", "reliability_figure", "subgroup_figure", "to_base64"]

_MAX_CURVES = 12


def to_base64(fig: Any) -> str:
    """PNG of ``fig`` as base64 text; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _curves(task: TaskSpec, targets: np.ndarray, probs: np.ndarray
            ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label, 0/1 truth, score) per curve to draw."""
    view = binary_view(task, targets, probs)
    if task.kind == "binary":
        return [(task.positive_class or "positive", view[0], view[1])]  # type: ignore[index]
    out = []
    if task.kind == "multilabel":
        t = np.asarray(targets, dtype=float)
        for j, name in enumerate(task.class_names):
            known = ~np.isnan(t[:, j])
            out.append((name, t[known, j].astype(int), probs[known, j]))
    else:
        idx = np.asarray(targets).astype(int)
        out = [(name, (idx == k).astype(int), probs[:, k]) for k, name in
               enumerate(task.class_names)]
    out = [c for c in out if 0 < c[1].sum() < len(c[1])]
    return sorted(out, key=lambda c: -c[1].sum())[:_MAX_CURVES]


def roc_pr_figure(task: TaskSpec, targets: np.ndarray, probs: np.ndarray,
                  points: dict[str, dict[str, Any]] | None = None) -> str | None:
    """ROC and precision-recall curves (one per class, one-vs-rest); operating points marked.

    Returns None when no class has both positive and negative cases.
    """
    curves = _curves(task, targets, probs)
    if not curves:
        return None
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(10, 4.2))
    for name, y, s in curves:
        fpr, tpr, _ = roc_curve(y, s)
        prec, rec, _ = precision_recall_curve(y, s)
        ax_roc.plot(fpr, tpr, lw=1.6, label=name)
        ax_pr.step(rec, prec, where="post", lw=1.6, label=name)
    for name, op in (points or {}).items():
        m = op["metrics"]
        sens, spec = m["sensitivity"]["value"], m["specificity"]["value"]
        if np.isfinite(sens) and np.isfinite(spec):
            ax_roc.plot(1 - spec, sens, "o", ms=7, label=f"{name} (test)")
    ax_roc.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax_roc.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC", xlim=(0, 1),
               ylim=(0, 1.02))
    ax_pr.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall",
              xlim=(0, 1), ylim=(0, 1.02))
    for ax in (ax_roc, ax_pr):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right" if ax is ax_roc else "lower left")
    return to_base64(fig)


def reliability_figure(section: dict[str, Any]) -> str | None:
    """Reliability diagram: observed frequency against mean predicted probability per bin."""
    before, after = section.get("curve_before"), section.get("curve_after")
    if not before or not before.get("predicted"):
        return None
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8, label="perfect")
    ax.plot(before["predicted"], before["observed"], "o-", label="before (raw)")
    if after and after.get("predicted"):
        ax.plot(after["predicted"], after["observed"], "s-", label="after temperature scaling")
    kind = section.get("ece_kind", "")
    ax.set(xlabel=f"mean predicted probability ({kind})", ylabel="observed frequency",
           xlim=(0, 1), ylim=(0, 1), title="Reliability")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return to_base64(fig)


def subgroup_figure(rows: list[dict[str, Any]], metric: str) -> str | None:
    """Forest plot of ``metric`` per subgroup with its interval and the overall value."""
    rows = [r for r in rows if r["metric"] == metric and np.isfinite(r["value"])]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(rows) + 1.2))
    ys = np.arange(len(rows))[::-1]
    for y, r in zip(ys, rows, strict=True):
        color = "#c0392b" if r["flag"] else ("#999999" if r["warning"] else "#2c3e50")
        if np.isfinite(r["low"]) and np.isfinite(r["high"]):
            ax.plot([r["low"], r["high"]], [y, y], c=color, lw=2)
        ax.plot(r["value"], y, "o", c=color)
    overall = rows[0]["overall"]
    if np.isfinite(overall):
        ax.axvline(overall, ls="--", c="grey", lw=1, label="overall")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_yticks(ys, [f"{r['column']}: {r['group']} (n={r['n']})" for r in rows], fontsize=8)
    ax.set_xlabel(f"{metric} (95% CI)")
    ax.grid(axis="x", alpha=0.3)
    return to_base64(fig)
