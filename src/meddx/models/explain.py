"""Explanations of ensemble and test-time-augmentation packages: the mean over members and views.

A combined package (:mod:`meddx.models.combine`) predicts the mean of its members' logits over
the input and its flips, so its explanation is built the same way. Each member gets the
modality's own explainer (:meth:`~meddx.modalities.base.Modality.explainer`: Grad-CAM for
images, integrated gradients or Grad-CAM for ECGs, in-silico mutagenesis, atom masking, tile
attention …); every member explains every view — the input flipped as the TTA wrapper flips
it — each view's map is flipped back to the input's orientation, and the ``members × views``
maps are averaged (with one class, chosen by the whole package when the caller names none).

Nothing here knows a modality: the explainer's output only has to be an array (or findings in
words with an array, where the explainer can put the averaged array back into words with
``findings(sample, attribution)``), and flip views exist only for the modalities whose
networks take flip TTA, whose maps lie on the input grid (the last ``spatial_dims`` axes).

Each member's map keeps its explainer's own scaling (Grad-CAM: 0..1 per map), so a region
every member and view marks keeps its weight and one that a single member marks is diluted to
its share: the averaged map of a K-member package peaks below 1 where the members disagree.

:func:`combined_explainer` is what every caller uses (the Predictor, hence REST, CDS Hooks and
DICOM results; ``meddx explain``; the report's error gallery; slide jobs).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from meddx.errors import ConfigError
from meddx.models.combine import Ensemble, FlipTTA

__all__ = ["AveragedExplainer", "combined_explainer", "explained_parts", "flip_input"]


def explained_parts(model: nn.Module) -> tuple[list[nn.Module], list[tuple[int, ...]]]:
    """The member networks of ``model`` and its views, as negative axes to flip (``()``: the
    input as it is); ``([model], [()])`` for a plain network.

    The axes count from the end, so they flip one input ``(C, *spatial)``, a batch
    ``(B, C, *spatial)`` and a map on the input grid (``(*spatial)``, ``(B, *spatial)``) alike.
    A network's own fused ensemble (GRU-D) is one member: its explainer explains it whole.
    """
    views: list[tuple[int, ...]] = [()]
    if isinstance(model, FlipTTA):
        end = 2 + model.spatial_dims  # FlipTTA's views are axes of a (B, C, *spatial) batch
        views = [tuple(a - end for a in v) for v in model.views]
        model = model.net
    members = list(model.members) if isinstance(model, Ensemble) else [model]
    return members, views


def _flip(value: Any, axes: tuple[int, ...]) -> Any:
    if not axes:
        return value
    if isinstance(value, torch.Tensor):
        return value.flip(axes)
    return np.flip(np.asarray(value), axes).copy()


def flip_input(sample: Any, axes: tuple[int, ...]) -> Any:
    """``sample`` (a Sample, tensor or array) flipped along ``axes`` (a Sample is copied, its
    metadata kept); unchanged for ``()``."""
    if not axes:
        return sample
    if hasattr(sample, "tensor"):
        flipped = copy.copy(sample)
        flipped.tensor = _flip(sample.tensor, axes)
        return flipped
    return _flip(sample, axes)


class AveragedExplainer:
    """One explainer per member; ``explain`` returns the mean map over members and views.

    Everything else (``plot``, ``overlay_png``, ``preview_png``, ``heatmap_png``, ``layer`` …)
    is the first member's explainer's: they draw an attribution, whichever network made it.
    ``summary`` adds ``averaged_over``.

    Args:
        explainers: the members' explainers (one architecture, so one kind).
        views: flip axes per view (see :func:`explained_parts`).
        whole: builds the modality's explainer of the whole package, used only for its
            ``top_class`` when the caller names no class.
    """

    def __init__(self, explainers: list[Any], views: list[tuple[int, ...]],
                 whole: Callable[[], Any] | None = None) -> None:
        if not explainers or not views:
            raise ConfigError("an averaged explanation needs at least one member and one view")
        self.explainers = explainers
        self.views = views
        self._whole_factory = whole
        self._whole: Any = None
        #: what the map is the mean of (also in ``summary`` and the service's answers)
        self.averaged = {"members": len(explainers), "views": len(views)}

    def describe(self) -> str:
        """``"mean of 2 members × 4 views"``: what the map averages, in words."""
        m, v = self.averaged["members"], self.averaged["views"]
        return (f"mean of {m} member{'s' if m != 1 else ''} × {v} "
                f"view{'s' if v != 1 else ''}")

    def __getattr__(self, name: str) -> Any:
        explainers = self.__dict__.get("explainers")
        if name.startswith("__") or not explainers:
            raise AttributeError(name)
        first = explainers[0]
        if name == "explain_batch":
            if not hasattr(first, "explain_batch"):
                raise AttributeError(name)
            return self._explain_batch
        if name == "summary":
            summary = first.summary

            def averaged_summary(sample: Any, attribution: Any, *args: Any, **kw: Any
                                 ) -> dict[str, Any]:
                return {**summary(sample, attribution, *args, **kw),
                        "averaged_over": dict(self.averaged)}
            return averaged_summary
        return getattr(first, name)

    def top_class(self, sample: Any) -> int | None:
        """The whole package's top class for ``sample`` (None where the member explainers
        choose no class: their map does not depend on one)."""
        if not hasattr(self.explainers[0], "top_class") or self._whole_factory is None:
            return None
        if self._whole is None:
            self._whole = self._whole_factory()
        return int(self._whole.top_class(sample))

    def explain(self, sample: Any, class_index: int | None = None) -> Any:
        """The mean over members and views of the members' explanations of ``sample`` for
        ``class_index`` (None: the whole package's top class), each view flipped back."""
        if class_index is None:
            class_index = self.top_class(sample)
        outs = [self._view(e, sample, v, class_index)
                for e in self.explainers for v in self.views]
        if isinstance(outs[0], tuple):  # (findings in words, attributions)
            mean = _mean([o[1] for o in outs])
            findings = getattr(self.explainers[0], "findings", None)
            if findings is None:
                raise ConfigError("this explainer's findings cannot be averaged over members",
                                  hint="explain one member package")
            return findings(sample, mean), mean
        return _mean(outs)

    def _view(self, explainer: Any, sample: Any, axes: tuple[int, ...],
              class_index: int | None) -> Any:
        out = explainer.explain(flip_input(sample, axes), class_index)
        if isinstance(out, tuple):
            return out[0], _flip(np.asarray(out[1]), axes)
        return _flip(np.asarray(out), axes)

    def _explain_batch(self, x: torch.Tensor, class_index: int | None = None) -> np.ndarray:
        """Maps ``(B, *spatial)`` for a batch, each the mean over members and views."""
        x = torch.as_tensor(x).float()
        if class_index is None:
            return np.stack([self.explain(x[i], None) for i in range(len(x))])
        return _mean([_flip(np.asarray(e.explain_batch(_flip(x, v), class_index)), v)
                      for e in self.explainers for v in self.views])


def _mean(arrays: list[Any]) -> np.ndarray:
    stacked = np.stack([np.asarray(a) for a in arrays])
    out = stacked.mean(axis=0)
    return out.astype(stacked.dtype) if np.issubdtype(stacked.dtype, np.floating) else out


def combined_explainer(modality: Any, model: nn.Module, input_spec: dict[str, Any],
                       **options: Any) -> Any:
    """The explainer of ``model`` (a package's network, plain or combined) through
    ``modality``: the modality's own for a plain network, else an :class:`AveragedExplainer`
    over its members and views.

    Args:
        modality: the package's :class:`~meddx.modalities.base.Modality`.
        model: the package's network (``ModelPackage.build_model()``, ``Predictor.model``).
        input_spec: the card's ``preprocessing``.
        **options: the modality explainer's options (``task``, ``network``, ``layer`` …).
    """
    members, views = explained_parts(model)
    if len(members) == 1 and len(views) == 1:
        return modality.explainer(members[0], input_spec, **options)
    explainers = [modality.explainer(m, input_spec, **options) for m in members]
    return AveragedExplainer(explainers, views,
                             whole=lambda: modality.explainer(model, input_spec, **options))
