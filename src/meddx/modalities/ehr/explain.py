"""Why a risk is what it is: captum attributions per variable, told in plain words.

Integrated gradients (captum) of the risk logit with respect to the input tensor, from a
baseline where nothing was measured (every value at the train mean, no masks, statics kept
except age and height at the mean). Attributions are summed per variable over the value and
mask channels and the window; the variables that push the risk most are described from their
own values ("lactate high and rising (4.2 mmol/L)", "GCS low (6)").
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddx.errors import InputMismatchError
from meddx.modalities.base import Sample
from meddx.modalities.ehr.features import decode_values, describe_variable
from meddx.modalities.ehr.io import variables

__all__ = ["EHRExplainer"]


class EHRExplainer:
    """Per-variable attributions and top findings for one ICU stay.

    Args:
        model: the network (eval mode is set here; weights are not changed).
        input_spec: the card's ``preprocessing`` (layout, variables, stats).
        n_steps: integration steps of integrated gradients (captum's Gauss-Legendre rule).
            8 by default: against 128 steps the per-variable attributions of the shipped
            ensemble are off by 0.5% and the four named drivers the same in 97% of stays, at
            60-70% of the cost of 16 (``benchmarks/ehr_attribution.py``).
        top_k: how many findings to name.
    """

    def __init__(self, model: torch.nn.Module, input_spec: Mapping[str, Any], n_steps: int = 8,
                 top_k: int = 4) -> None:
        self.model = model.eval()
        self.spec = input_spec
        self.n_steps = n_steps
        self.top_k = top_k
        self.names: list[str] = list(input_spec["variables"])
        self._n_outputs: int | None = None

    def _tensor(self, x: Any) -> torch.Tensor:
        t = x.tensor if isinstance(x, Sample) else x
        t = torch.as_tensor(np.asarray(t) if not isinstance(t, torch.Tensor) else t).float()
        if t.dim() == 2:
            t = t[None]
        expected = int(self.spec["channels"])
        if t.dim() != 3 or t.shape[0] != 1 or t.shape[1] != expected:
            raise InputMismatchError(f"expected one stay tensor ({expected}, T), got "
                                     f"{tuple(t.shape)}")
        return t

    def _baseline(self, x: torch.Tensor) -> torch.Tensor:
        lay = self.spec["layout"]
        base = x.clone()
        base[:, lay["values"][0]:lay["masks"][1]] = 0
        s0 = lay["static"][0]
        base[:, s0] = 0  # age at the mean
        base[:, s0 + 3:s0 + 5] = 0  # height unknown
        return base

    def attributions(self, x: Any, class_index: int | None = None) -> np.ndarray:
        """Integrated-gradients attribution, same shape as the input ``(C, T)``."""
        from captum.attr import IntegratedGradients

        t = self._tensor(x)
        ig = IntegratedGradients(self.model)
        # one logit (binary task): always the risk of the positive class, whatever the decision
        target = None if class_index is None or self._outputs(t) == 1 else class_index
        with torch.enable_grad():
            attr = ig.attribute(t, baselines=self._baseline(t), target=target,
                                n_steps=self.n_steps, internal_batch_size=self.n_steps)
        return attr.detach()[0].numpy()

    def _outputs(self, t: torch.Tensor) -> int:
        """How many outputs the network has (asked once rather than a forward pass per call)."""
        if self._n_outputs is None:
            with torch.no_grad():
                self._n_outputs = int(self.model(t).shape[-1])
        return self._n_outputs

    def per_variable(self, attr: np.ndarray) -> dict[str, float]:
        """Attribution per variable (values + masks over the window) and for age."""
        v = len(self.names)
        per = attr[:v].sum(-1) + attr[v:2 * v].sum(-1)
        out = {n: float(per[i]) for i, n in enumerate(self.names)}
        out["Age"] = float(attr[self.spec["layout"]["static"][0]].sum())
        return out

    def findings(self, x: Any, attr: np.ndarray, limit: int | None = None) -> list[str]:
        """The variables that raise the risk most, in words; then those that lower it most."""
        t = self._tensor(x)[0].numpy()
        raw = decode_values(t, self.spec["stats"])
        v = len(self.names)
        per = self.per_variable(attr)
        ranked = sorted(per.items(), key=lambda kv: -abs(kv[1]))[: limit or self.top_k]
        up = [(n, a) for n, a in ranked if a > 0]
        down = [(n, a) for n, a in ranked if a < 0]
        words = []
        for group, suffix in ((up, ""), (down, " (lowers the risk)")):
            for name, _ in group:
                if name == "Age":
                    age_m, age_s = self.spec["stats"]["age"]
                    age = t[self.spec["layout"]["static"][0], 0] * age_s + age_m
                    words.append(f"age {age:.0f}{suffix}")
                    continue
                i = self.names.index(name)
                z = np.where(t[v + i] > 0, t[i], np.nan)
                words.append(describe_variable(name, raw[i], z) + suffix)
        return words

    def explain(self, x: Any, class_index: int | None = None) -> tuple[list[str], np.ndarray]:
        """Top findings in words and the attribution array ``(C, T)``.

        Args:
            x: a :class:`Sample` from ``EHRModality.read`` or its tensor ``(C, T)``.
            class_index: the class to explain for multi-output models; binary (one-logit)
                models always explain the risk of the positive class, so "raises the risk"
                means what it says whatever the decision was.
        """
        attr = self.attributions(x, class_index)
        return self.findings(x, attr), attr

    def plot(self, sample: Any, attribution: np.ndarray, path: str | Path,
             title: str | None = None, top: int = 10) -> Path:
        """PNG heat map: attribution per hour for the ``top`` variables (red raises the risk)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        v = len(self.names)
        per_hour = attribution[:v] + attribution[v:2 * v]
        order = np.argsort(-np.abs(per_hour).sum(-1))[:top]
        lim = float(np.abs(per_hour[order]).max()) or 1.0
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(order) + 1.2), dpi=110)
        ax.imshow(per_hour[order], aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_yticks(range(len(order)), [variables()[self.names[i]].plain for i in order],
                      fontsize=8)
        ax.set_xlabel("hours since ICU admission")
        ax.set_title(title or "contribution to the risk (red raises it)", fontsize=9)
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out)
        plt.close(fig)
        return out

    @staticmethod
    def plain_name(parameter: str) -> str:
        """The words used for a PhysioNet parameter."""
        return variables()[parameter].plain
