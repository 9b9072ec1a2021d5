"""The monitoring report: ``monitor.html`` (self-contained, figures inline) and ``monitor.json``.

Figures per model: volume with error and OOD rates, drift (PSI of the predicted risk and of the
input statistics per window, with the 0.1 / 0.25 lines and the noise level of each window),
the binned distributions against the training reference, live performance with 95% CIs and
the reliability diagram, and CDS Hooks acceptance.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from meddx.reporting.figures import plt, to_base64

__all__ = ["write_monitor", "render_monitor", "monitor_figures"]

logger = logging.getLogger(__name__)

_STATUS_COLOR = {"stable": "#27ae60", "noise": "#999999", "moderate": "#e67e22",
                 "major": "#c0392b"}


def _val(entry: Any) -> float:
    if isinstance(entry, dict):
        entry = entry.get("value")
    return float(entry) if entry is not None and math.isfinite(float(entry)) else float("nan")


def _xticks(ax: Any, labels: list[str]) -> None:
    step = max(1, len(labels) // 12)
    ticks = list(range(0, len(labels), step))
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=30, ha="right", fontsize=7)


def volume_figure(windows: list[dict[str, Any]]) -> str | None:
    """Answers per window (bars), error and OOD rates (lines)."""
    if not windows:
        return None
    labels = [w["label"] for w in windows]
    x = np.arange(len(windows))
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.bar(x, [w["answers"] for w in windows], color="#aab7c4", label="answers")
    ax.set_ylabel("answers")
    ax2 = ax.twinx()
    ax2.plot(x, [_val(w["error_rate"]) for w in windows], "o-", c="#c0392b", label="error rate")
    ax2.plot(x, [_val(w["ood_rate"]) for w in windows], "s--", c="#8e44ad", label="OOD rate")
    ax2.set_ylabel("rate")
    ax2.set_ylim(0, 1)
    _xticks(ax, labels)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="upper left")
    ax.set_title("Volume, errors and out-of-distribution answers per window")
    return to_base64(fig)


def _psi_panel(ax: Any, x: np.ndarray, series: list[tuple[str, list[dict[str, Any]]]]) -> None:
    markers = "osD^v"
    for j, (name, ds) in enumerate(series):
        ys = [_val(d.get("psi")) for d in ds]
        ax.plot(x, ys, "-", lw=1, alpha=0.6, label=name)
        for xi, d, y in zip(x, ds, ys, strict=True):
            ax.plot(xi, y, markers[j % 5], c=_STATUS_COLOR.get(d.get("status", ""), "#2c3e50"))
        ax.plot(x, [_val(d.get("psi_null95")) for d in ds], ":", c="grey", lw=0.8)
    ax.axhline(0.1, ls="--", c="#e67e22", lw=0.8)
    ax.axhline(0.25, ls="--", c="#c0392b", lw=0.8)
    ax.set_ylabel("PSI")
    ax.grid(alpha=0.3)


def drift_figure(windows: list[dict[str, Any]]) -> str | None:
    """PSI per window: predicted risk (left) and input statistics (right)."""
    ws = [w for w in windows if "psi" in w.get("risk", {})]
    if not ws:
        return None
    labels = [w["label"] for w in ws]
    x = np.arange(len(ws))
    stats = [k for k in ws[0].get("inputs", {}) if "psi" in ws[0]["inputs"][k]]
    fig, axes = plt.subplots(1, 2 if stats else 1, figsize=(10 if stats else 5.5, 3.4),
                             squeeze=False)
    _psi_panel(axes[0, 0], x, [("risk", [w["risk"] for w in ws])])
    axes[0, 0].set_title("Predicted risk vs training (PSI)")
    _xticks(axes[0, 0], labels)
    if stats:
        _psi_panel(axes[0, 1], x, [(k, [w["inputs"].get(k, {}) for w in ws]) for k in stats])
        axes[0, 1].set_title("Input statistics vs training (PSI)")
        axes[0, 1].legend(fontsize=7, loc="upper left")
        _xticks(axes[0, 1], labels)
    fig.tight_layout()
    return to_base64(fig)


def _bin_labels(edges: list[float]) -> list[str]:
    e = ["-∞", *[f"{v:.3g}" for v in edges], "∞"]
    return [f"{e[i]}–{e[i + 1]}" for i in range(len(e) - 1)]


def distribution_figure(model: dict[str, Any]) -> str | None:
    """Reference vs live share per reference bin: risk and each input statistic."""
    ref = (model.get("package") or {}).get("reference")
    overall = model["overall"]
    if not ref or "fractions" not in overall.get("risk", {}):
        return None
    panels = [("predicted risk", ref["risk"], overall["risk"])]
    panels += [(f"input {k}", ref["inputs"][k], overall["inputs"][k])
               for k in ref.get("inputs", {}) if "fractions" in overall["inputs"].get(k, {})]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for ax, (name, hist, live) in zip(axes[0], panels, strict=True):
        x = np.arange(len(hist["fractions"]))
        ax.bar(x - 0.2, hist["fractions"], width=0.4, label="training (calib)", color="#95a5a6")
        ax.bar(x + 0.2, live["fractions"], width=0.4, label="live", color="#2980b9")
        ax.set_xticks(x, _bin_labels(hist["edges"]), rotation=45, ha="right", fontsize=6)
        ax.set_title(f"{name}: PSI {_val(live.get('psi')):.3f}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_ylabel("share of cases (reference bins)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return to_base64(fig)


def _ci_series(ax: Any, x: np.ndarray, entries: list[dict[str, Any]], color: str) -> None:
    v = np.array([_val(e) for e in entries])
    lo = np.array([_val(e.get("low")) if e else np.nan for e in entries])
    hi = np.array([_val(e.get("high")) if e else np.nan for e in entries])
    ok = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(v)
    ax.errorbar(x[ok], v[ok], yerr=[v[ok] - lo[ok], hi[ok] - v[ok]], fmt="o", c=color,
                capsize=3)
    ax.plot(x[~ok & np.isfinite(v)], v[~ok & np.isfinite(v)], "o", mfc="none", c=color)
    ax.grid(alpha=0.3)


def performance_figure(model: dict[str, Any]) -> str | None:
    """Live AUROC and ECE per window with 95% CIs, and the overall reliability diagram."""
    ws = [w for w in model["windows"] if w.get("performance")]
    overall = model["overall"].get("performance")
    if not overall:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    x = np.arange(len(ws))
    labels = [w["label"] for w in ws]
    _ci_series(axes[0], x, [w["performance"].get("auroc", {}) for w in ws], "#2c3e50")
    axes[0].set(title="Live AUROC (95% CI)", ylim=(0, 1.02))
    _ci_series(axes[1], x, [w["performance"].get("ece", {}) for w in ws], "#8e44ad")
    axes[1].set(title="Live ECE (95% CI)")
    for ax in axes[:2]:
        _xticks(ax, labels)
    rel = overall.get("reliability") or {}
    axes[2].plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    if rel.get("predicted"):
        axes[2].plot(rel["predicted"], rel["observed"], "o-", c="#2980b9")
    axes[2].set(title=f"Reliability, all windows (n={overall['n']})", xlim=(0, 1), ylim=(0, 1),
                xlabel="mean predicted risk", ylabel="observed rate")
    axes[2].grid(alpha=0.3)
    return to_base64(fig)


def acceptance_figure(windows: list[dict[str, Any]]) -> str | None:
    """CDS Hooks acceptance rate per window with its Wilson 95% CI."""
    ws = [w for w in windows if w["cds"]["feedback"]]
    if not ws:
        return None
    fig, ax = plt.subplots(figsize=(6, 3))
    x = np.arange(len(ws))
    _ci_series(ax, x, [w["cds"]["acceptance"] for w in ws], "#16a085")
    ax.set(title="CDS card acceptance (accepted / feedback, 95% CI)", ylim=(0, 1.02))
    _xticks(ax, [w["label"] for w in ws])
    return to_base64(fig)


def monitor_figures(model: dict[str, Any]) -> dict[str, str | None]:
    """Every figure of one model's section (None where there is nothing to draw)."""
    return {"volume": volume_figure(model["windows"]), "drift": drift_figure(model["windows"]),
            "distribution": distribution_figure(model),
            "performance": performance_figure(model),
            "acceptance": acceptance_figure(model["windows"])}


def render_monitor(result: dict[str, Any]) -> str:
    """The HTML page for a ``meddx monitor`` result."""
    from meddx.reporting.report import _environment
    from meddx.version import __version__

    sections = [{"m": m, "figures": monitor_figures(m)} for m in result["models"]]
    return _environment().get_template("monitor.html.j2").render(
        r=result, sections=sections, version=__version__)


def write_monitor(result: dict[str, Any], out: str | Path) -> dict[str, str]:
    """Write ``monitor.json`` and ``monitor.html`` into ``out``; returns their paths."""
    from meddx.statistics import json_safe

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"json": str(folder / "monitor.json"), "html": str(folder / "monitor.html")}
    Path(files["html"]).write_text(render_monitor(result), encoding="utf-8")
    Path(files["json"]).write_text(json.dumps(json_safe({**result, "files": files}), indent=2),
                                   encoding="utf-8")
    logger.info("monitoring report written to %s", files["html"])
    return files
