"""Explaining an ECG prediction on the trace: integrated gradients (captum) or 1D Grad-CAM
(monai.visualize), drawn as a heat strip beneath each lead.

Attributions are computed per window (the network's input) and stitched back onto the
record's time line, averaging where windows overlap.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddx.errors import ConfigError

__all__ = ["ECGExplainer", "stitch_windows", "heat_strip", "on_time_line", "top_span",
           "plot_ecg_explanation", "plot_ecg_explanation_for"]

logger = logging.getLogger(__name__)

METHODS = ("integrated_gradients", "gradcam")


class _ClassScores(torch.nn.Module):
    """Per-class scores in ``class_names`` order: a single (binary) logit z scores the
    positive class z and the other -z; otherwise the logits themselves."""

    def __init__(self, net: torch.nn.Module, task: Any | None) -> None:
        super().__init__()
        self.net = net
        self.positive = task.positive_index if task is not None and task.num_outputs == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        if self.positive is None:
            return z
        return torch.cat([-z, z], dim=1) if self.positive == 1 else torch.cat([z, -z], dim=1)


def _as_windows(sample: Any) -> tuple[torch.Tensor, bool]:
    x = getattr(sample, "tensor", sample)
    x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    if x.ndim == 2:
        return x[None], True
    if x.ndim != 3:
        raise ConfigError(f"an ECG to explain is (leads, samples) or (windows, leads, samples), "
                          f"got shape {tuple(x.shape)}")
    return x, False


class ECGExplainer:
    """Attributions over the waveform for one class (``ECGModality.explainer`` returns one).

    Args:
        model: the fp32 network (copied; the caller's module is never touched).
        input_spec: the card's ``preprocessing`` (for the rate when plotting).
        method: ``integrated_gradients`` (captum; zero baseline, i.e. the record's mean after
            z-scoring) or ``gradcam`` (monai.visualize.GradCAM on ``layer``).
        n_steps: integration steps for integrated gradients.
        layer: Grad-CAM target layer (default: the builder's ``gradcam_layer``, via ``network``).
        network: registry name of the network.
        task: the TaskSpec, so class indices follow ``class_names`` (binary: one logit).
    """

    def __init__(self, model: torch.nn.Module, input_spec: dict[str, Any] | None = None, *,
                 method: str = "integrated_gradients", n_steps: int = 32,
                 layer: str | None = None, network: str | None = None, task: Any = None,
                 **_: Any) -> None:
        if method not in METHODS:
            raise ConfigError(f"unknown ECG explanation method {method!r}; choose one of {METHODS}")
        if method == "gradcam" and layer is None and network is not None:
            from meddx.modalities.networks import network_builder

            layer = getattr(network_builder(network), "gradcam_layer", None)
        if method == "gradcam" and not isinstance(layer, str):
            raise ConfigError("Grad-CAM needs a target layer (layer=… or network=…)")
        net = copy.deepcopy(model).float().eval()
        for p in net.parameters():
            p.requires_grad_(True)
        self.scores = _ClassScores(net, task)
        self.input_spec = dict(input_spec or {})
        self.method, self.n_steps, self.layer, self.task = method, n_steps, layer, task

    def explain(self, sample: Any, class_index: int | None = None) -> np.ndarray:
        """Attribution with the input's shape, (leads, samples) or (windows, leads, samples),
        for ``class_index`` in ``class_names`` order (None: the record's most probable class)."""
        x, squeeze = _as_windows(sample)
        with torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast("cpu", enabled=False):
            x = x.clone()
            if class_index is None:
                class_index = self.top_class(x)
            if self.method == "integrated_gradients":
                from captum.attr import IntegratedGradients

                attr = IntegratedGradients(self.scores).attribute(
                    x, baselines=torch.zeros_like(x), target=int(class_index),
                    n_steps=self.n_steps,
                    internal_batch_size=min(256, self.n_steps * x.shape[0]))
                out = attr.detach().numpy()
            else:
                from monai.visualize import GradCAM

                # MONAI's default post-processing maps (min, max) to (1, 0) — it would flip the
                # strip; keep the raw map and scale it to 0..1 per window here
                cam = GradCAM(nn_module=self.scores, target_layers=f"net.{self.layer}",
                              postprocessing=lambda m: m)
                heat = cam(x, class_idx=int(class_index)).detach().float().numpy()  # (W, 1, L)
                lo = heat.min(axis=-1, keepdims=True)
                span = heat.max(axis=-1, keepdims=True) - lo
                heat = np.where(span > 0, (heat - lo) / np.where(span > 0, span, 1), 0.0)
                out = np.broadcast_to(heat, x.shape).copy()
        out = np.nan_to_num(out.astype(np.float32))
        return out[0] if squeeze else out

    def top_class(self, sample: Any) -> int:
        """The record's most probable class (mean probability over its windows)."""
        x, _ = _as_windows(sample)
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            return int(torch.softmax(self.scores(x), 1).mean(0).argmax())

    def plot(self, sample: Any, attribution: np.ndarray, path: str | Path,
             title: str | None = None) -> Path:
        """Write the trace with the attribution as a heat strip beneath (PNG) to ``path``."""
        return plot_ecg_explanation_for(sample, attribution, path, title,
                                        fs=self.input_spec.get("fs"))

    def summary(self, sample: Any, attribution: np.ndarray) -> dict[str, Any]:
        """The method and the most important time span of the record (see :func:`top_span`)."""
        _, attr, rate = on_time_line(sample, attribution, self.input_spec.get("fs"))
        return {"method": self.method, **top_span(attr, rate)}


def on_time_line(sample: Any, attribution: np.ndarray, fs: float | None = None
                 ) -> tuple[np.ndarray, np.ndarray, float]:
    """(signal, attribution, rate) of a Sample (or tensor) read by ``ECGModality.read`` on
    the record's time line: windows are stitched back (overlaps averaged) or, without
    positions, laid end to end."""
    meta = getattr(sample, "meta", {}) or {}
    attr = np.asarray(attribution)
    x, single = _as_windows(sample)
    rate = float(meta.get("fs") or fs or 1.0)
    if single:
        signal = x[0].numpy()
    elif meta.get("starts") is not None:
        n = int(meta["n_samples"])
        attr = stitch_windows(attr, meta["starts"], n)
        signal = meta.get("signal")
        if signal is None:
            signal = stitch_windows(x.numpy(), meta["starts"], n)
    else:
        c = x.shape[1]
        signal = x.numpy().transpose(1, 0, 2).reshape(c, -1)
        attr = attr.transpose(1, 0, 2).reshape(c, -1)
    return np.asarray(signal), np.asarray(attr), rate


def plot_ecg_explanation_for(sample: Any, attribution: np.ndarray, path: str | Path,
                             title: str | None = None, fs: float | None = None) -> Path:
    """Plot a Sample (or tensor) read by ``ECGModality.read`` with its attribution: windows
    are stitched back onto the record's time line first."""
    signal, attr, rate = on_time_line(sample, attribution, fs)
    leads = (getattr(sample, "meta", {}) or {}).get("leads")
    return plot_ecg_explanation(signal, attr, rate, path, leads=leads, title=title)


def top_span(attribution: np.ndarray, fs: float) -> dict[str, float]:
    """The most important stretch of a record: the peak of the lead-averaged heat strip
    (:func:`heat_strip`) and the contiguous span around it where the heat stays at or above
    half the peak, in seconds from the record's start.

    Args:
        attribution: (leads, samples) on the record's time line.
        fs: its sampling rate.
    """
    heat = heat_strip(np.atleast_2d(attribution), fs).mean(axis=0)
    peak = int(np.argmax(heat))
    if heat[peak] <= 0:
        return {"peak_s": 0.0, "start_s": 0.0, "end_s": round(len(heat) / fs, 3)}
    above = heat >= 0.5 * heat[peak]
    lo = peak - int(np.argmin(above[peak::-1])) + 1 if not above[: peak + 1].all() else 0
    hi = peak + int(np.argmin(above[peak:])) if not above[peak:].all() else len(heat)
    return {"peak_s": round(peak / fs, 3), "start_s": round(lo / fs, 3),
            "end_s": round(hi / fs, 3)}


def stitch_windows(arrays: np.ndarray, starts: list[int], n_samples: int) -> np.ndarray:
    """Windows (W, C, L) → the record's time line (C, n_samples), averaging overlaps. A record
    shorter than one window was centre-padded; the padding is cut off again."""
    w, c, length = arrays.shape
    if n_samples <= length:
        pad = (length - n_samples) // 2
        return arrays[0][:, pad:pad + n_samples]
    total = np.zeros((c, n_samples))
    count = np.zeros(n_samples)
    for a, s in zip(arrays, starts, strict=True):
        total[:, s:s + length] += a
        count[s:s + length] += 1
    return total / np.maximum(count, 1)


def heat_strip(attribution: np.ndarray, fs: float, smooth_s: float = 0.15) -> np.ndarray:
    """Per-lead |attribution| smoothed over ``smooth_s`` seconds and scaled to [0, 1]."""
    a = np.abs(np.asarray(attribution, dtype=np.float64))
    k = max(1, int(round(smooth_s * fs)))
    kernel = np.ones(k) / k
    sm = np.stack([np.convolve(row, kernel, mode="same") for row in a])
    top = sm.max()
    return sm / top if top > 0 else sm


def plot_ecg_explanation(signal: np.ndarray, attribution: np.ndarray, fs: float,
                         path: str | Path, leads: list[str] | None = None,
                         title: str | None = None) -> Path:
    """Draw each lead's trace with its attribution as a heat strip beneath; writes a PNG.

    Args:
        signal: (leads, samples) as the model saw it (resampled, z-scored).
        attribution: same shape as ``signal``.
        fs: sampling rate of ``signal``.
        path: output PNG.
        leads: lead names for the axis labels.
        title: figure title (e.g. the predicted rhythm and its probability).
    """
    # a bare Figure (no pyplot state) is safe in threads, e.g. inside the service
    from matplotlib.figure import Figure

    sig = np.atleast_2d(signal)
    heat = heat_strip(np.atleast_2d(attribution), fs)
    c, n = sig.shape
    t = np.arange(n) / fs
    width = float(np.clip(n / fs * 0.4, 8, 24))
    fig = Figure(figsize=(width, 2.2 * c + 0.6))
    axes = fig.subplots(2 * c, 1, sharex=True, gridspec_kw={"height_ratios": [4, 1] * c},
                        squeeze=False)
    for j in range(c):
        ax, strip = axes[2 * j, 0], axes[2 * j + 1, 0]
        ax.plot(t, sig[j], lw=0.6, color="black")
        ax.set_ylabel(leads[j] if leads and j < len(leads) else f"lead {j + 1}")
        ax.grid(alpha=0.3)
        strip.imshow(heat[j][None, :], aspect="auto", cmap="inferno", vmin=0, vmax=1,
                     extent=(t[0], t[-1] if n > 1 else 1 / fs, 0, 1))
        strip.set_yticks([])
        strip.set_ylabel("attr.", rotation=0, labelpad=18, fontsize=8)
    axes[-1, 0].set_xlabel("time (s)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, format="png")
    return out
