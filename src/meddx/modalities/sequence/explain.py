"""In-silico mutagenesis (ISM) for DNA models, and its sequence-logo-style figure.

ISM substitutes every base at every position (L × 4 variants, scored in a few batched
forward passes) and records Δ = score(variant) − score(reference) for the explained class.
From Δ (4 × L):

* ``importance`` per position = the largest |Δ| of any substitution there;
* ``contribution`` per position = −mean Δ over the four bases: how much the class probability
  falls, on average, when the base is changed (positive: the base supports the class).

The figure draws the reference bases as letters whose height is the contribution (above the
axis: supports the class, below: opposes it) over a heat map of Δ for every substitution.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddx.errors import ConfigError, InputMismatchError
from meddx.modalities.scoring import class_score, top_class

__all__ = ["ISMExplainer", "ISMResult", "in_silico_mutagenesis", "plot_ism"]

logger = logging.getLogger(__name__)

_COLORS = {"A": "#109648", "C": "#255C99", "G": "#F7B32B", "T": "#D62839"}


@dataclass
class ISMResult:
    """Mutagenesis of one sequence for one class."""

    sequence: str
    class_index: int
    reference_score: float
    delta: np.ndarray  # (4, L): Δ probability per substituted base (A, C, G, T)

    @property
    def importance(self) -> np.ndarray:
        """(L,) largest |Δ| at each position."""
        return np.abs(self.delta).max(axis=0)

    @property
    def contribution(self) -> np.ndarray:
        """(L,) −mean Δ over the four bases (positive: the reference base supports the class)."""
        return -self.delta.mean(axis=0)

    def top_positions(self, k: int = 5) -> list[int]:
        """The ``k`` most important positions, 1-based, most important first."""
        return [int(i) + 1 for i in np.argsort(-self.importance, kind="stable")[:k]]


@torch.no_grad()
def in_silico_mutagenesis(model: torch.nn.Module, x: torch.Tensor, class_index: int,
                          input_spec: dict[str, Any], task: Any | None = None,
                          batch_size: int = 1024) -> tuple[float, np.ndarray]:
    """Score every single-base substitution of the one-hot sequence ``x`` (4, L).

    Returns:
        (reference score, Δ array (4, L)); Δ at the reference base of an unambiguous position is 0.
    """
    if x.ndim != 2 or x.shape[0] != 4:
        raise InputMismatchError(f"ISM takes one one-hot sequence (4, L), got {tuple(x.shape)}")
    model.eval()
    x = x.float()
    length = x.shape[1]
    idx = torch.arange(4 * length)
    pos, base = idx // 4, idx % 4
    variants = x.unsqueeze(0).repeat(4 * length, 1, 1)
    variants[idx, :, pos] = 0.0
    variants[idx, base, pos] = 1.0
    ref = float(class_score(model(x.unsqueeze(0)), class_index, input_spec, task)[0])
    scores = torch.cat([class_score(model(variants[i : i + batch_size]), class_index,
                                    input_spec, task)
                        for i in range(0, len(variants), batch_size)])
    delta = (scores.reshape(length, 4).T - ref).numpy()
    return ref, delta


class ISMExplainer:
    """``explain(sample, class_index) -> Δ (4, L)``; ``plot`` writes the logo figure.

    Args:
        model: the fp32 network (eval mode is set here).
        input_spec: the package's preprocessing (records task kind and positive class).
        task: optional :class:`~meddx.tasks.TaskSpec` (needed for ordinal tasks).
        batch_size: variants per forward pass.
    """

    def __init__(self, model: torch.nn.Module, input_spec: dict[str, Any] | None = None, *,
                 task: Any = None, batch_size: int = 1024, **_: Any) -> None:
        self.model = model
        self.input_spec = dict(input_spec or {})
        self.task = task
        self.batch_size = batch_size
        self.last: ISMResult | None = None

    def explain(self, sample: Any, class_index: int | None = None) -> np.ndarray:
        """Δ probability (4, L) for every substitution of ``sample`` (a Sample from
        ``modality.read`` or a (4, L) tensor) for ``class_index`` (None: the predicted class);
        the full :class:`ISMResult` is kept as ``self.last``."""
        self.last = self.mutagenesis(sample, class_index)
        return self.last.delta

    def mutagenesis(self, sample: Any, class_index: int | None = None) -> ISMResult:
        """Full :class:`ISMResult` for a Sample (from ``modality.read``) or a (4, L) tensor."""
        x, seq = _tensor_and_sequence(sample)
        want = self.input_spec.get("length")
        if want is not None and x.shape[-1] != want:
            raise InputMismatchError(f"sequence has {x.shape[-1]} bases; the model takes {want}")
        if class_index is None:
            class_index = self.top_class(x)
        ref, delta = in_silico_mutagenesis(self.model, x, class_index, self.input_spec,
                                           self.task, self.batch_size)
        return ISMResult(seq, class_index, ref, delta)

    def top_class(self, sample: Any) -> int:
        """The network's predicted class for a Sample or a (4, L) tensor."""
        x, _ = _tensor_and_sequence(sample)
        self.model.eval()
        with torch.no_grad():
            return top_class(self.model(x.unsqueeze(0)), self.input_spec, self.task)

    def plot(self, sample: Any, attribution: np.ndarray, path: str | Path,
             class_name: str | None = None) -> Path:
        """Write the ISM figure (PNG/SVG/PDF by suffix) of ``attribution`` (Δ, 4 × L)."""
        if attribution is None:
            raise ConfigError("no attribution to plot: call explain() first")
        _, seq = _tensor_and_sequence(sample)
        which = class_name or (f"class {self.last.class_index}" if self.last else "")
        title = f"in-silico mutagenesis: {which}"
        return plot_ism(seq, attribution, path, title=title)

    def summary(self, sample: Any, attribution: np.ndarray, k: int = 5) -> dict[str, Any]:
        """The ``k`` most important positions of ``attribution`` (Δ, 4 × L), most important
        first: 1-based position, reference base, importance (largest |Δ|) and contribution
        (−mean Δ; positive: the base supports the class)."""
        _, seq = _tensor_and_sequence(sample)
        result = ISMResult(seq, -1, float("nan"), np.asarray(attribution, dtype=float))
        importance, contribution = result.importance, result.contribution
        return {"method": "in_silico_mutagenesis", "top_positions": [
            {"position": pos, "base": seq[pos - 1] if pos <= len(seq) else "N",
             "importance": round(float(importance[pos - 1]), 6),
             "contribution": round(float(contribution[pos - 1]), 6)}
            for pos in result.top_positions(k)]}


def _tensor_and_sequence(sample: Any) -> tuple[torch.Tensor, str]:
    from meddx.modalities.base import Sample

    if isinstance(sample, Sample):
        x = torch.as_tensor(sample.tensor)
        seq = sample.meta.get("sequence") or _decode(x)
    else:
        x = torch.as_tensor(sample)
        seq = _decode(x)
    if x.ndim == 3 and x.shape[0] == 1:
        x = x[0]
    return x.float(), seq


def _decode(x: torch.Tensor) -> str:
    x = x[0] if x.ndim == 3 else x
    return "".join("ACGT"[i] if x[i, j] > 0.99 else "N"
                   for j, i in enumerate(x.argmax(0).tolist()))


def _letter(ax: Any, letter: str, x: float, bottom: float, height: float, color: str) -> None:
    from matplotlib import transforms
    from matplotlib.font_manager import FontProperties
    from matplotlib.patches import PathPatch
    from matplotlib.textpath import TextPath

    if height <= 0:
        return
    path = TextPath((0, 0), letter, size=1, prop=FontProperties(family="DejaVu Sans",
                                                               weight="bold"))
    ext = path.get_extents()
    t = (transforms.Affine2D().translate(-ext.x0, -ext.y0)
         .scale(0.9 / ext.width, height / ext.height).translate(x - 0.45, bottom))
    ax.add_patch(PathPatch(t.transform_path(path), facecolor=color, edgecolor="none"))


def plot_ism(sequence: str, delta: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Logo of per-position contributions over a heat map of Δ for every substitution.

    Args:
        sequence: the reference sequence (length L).
        delta: (4, L) Δ probability per substituted base (A, C, G, T).
        path: output file; the suffix picks the format.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    delta = np.asarray(delta, dtype=float)
    length = delta.shape[1]
    contribution = -delta.mean(axis=0)
    fig = Figure(figsize=(max(6.0, 0.16 * length + 1.5), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=[1.2, 1])
    for j, (base, h) in enumerate(zip(sequence, contribution, strict=False)):
        color = _COLORS.get(base, "#777777")
        _letter(ax1, base, j + 1, 0.0 if h >= 0 else h, abs(h), color)
    lim = max(float(np.abs(contribution).max()), 1e-6) * 1.1
    ax1.set_ylim(-lim, lim)
    ax1.axhline(0, color="black", linewidth=0.6)
    ax1.set_ylabel("contribution\n(−mean Δp)")
    ax1.set_title(title or "in-silico mutagenesis")
    vmax = max(float(np.abs(delta).max()), 1e-6)
    im = ax2.imshow(delta, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax,
                    extent=(0.5, length + 0.5, 3.5, -0.5), interpolation="nearest")
    ax2.set_yticks(range(4), list("ACGT"))
    ax2.set_xlabel("position (1-based)")
    ax2.set_ylabel("substituted\nbase")
    ax2.set_xlim(0.5, length + 0.5)
    fig.colorbar(im, ax=ax2, label="Δ probability", shrink=0.9)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    return out
