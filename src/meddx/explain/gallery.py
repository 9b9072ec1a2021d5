"""Pictures for the report's error gallery, through each modality's explainer: heat maps over
the input where the explainer draws them (``explain_batch`` + ``overlay_png``: images), its own
plot or findings in words otherwise, or none with a reason."""

from __future__ import annotations

import base64
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from meddx.errors import MeddxError
from meddx.modalities.base import Sample

__all__ = ["attach_explanations"]

logger = logging.getLogger(__name__)


def _explainer(package: Any, modality: Any, layer: str | None, method: str) -> Any:
    from meddx.models.explain import combined_explainer

    card = package.card
    options: dict[str, Any] = {"task": card.task, "network": card.network.get("name")}
    if layer is not None:
        options["layer"] = layer
    if method != "gradcam":
        options["method"] = method
    return combined_explainer(modality, package.build_model(), card.preprocessing, **options)


def _averaged(explainer: Any) -> str:
    """``"mean of 2 members × 4 views"`` for an ensemble or TTA package, else ``""``."""
    return explainer.describe() if hasattr(explainer, "averaged") else ""


def _heatmap_pictures(explainer: Any, package: Any, modality: Any, split: Any,
                      cases: list[dict[str, Any]], method: str) -> None:
    """Heat maps over the input (images): one batched explanation per explained class."""
    card = package.card
    by_class: dict[int, list[dict[str, Any]]] = {}
    for case in cases:
        by_class.setdefault(case["explain_class"], []).append(case)
    for k, group in by_class.items():
        xs = torch.stack([torch.as_tensor(modality.item_tensor(split.inputs[c["index"]],
                                                               card.preprocessing))
                          for c in group]).float()
        maps = explainer.explain_batch(xs, k)
        averaged = _averaged(explainer)
        for case, x, m in zip(group, xs, maps, strict=True):
            case["image"] = base64.b64encode(explainer.overlay_png(x, m)).decode("ascii")
            case["image_caption"] = (f"{'Grad-CAM++' if method == 'gradcampp' else 'Grad-CAM'} "
                                     f"for '{card.task.class_names[k]}' (layer {explainer.layer}"
                                     f"{'; ' + averaged if averaged else ''})")


def _other_pictures(explainer: Any, package: Any, modality: Any, split: Any,
                    cases: list[dict[str, Any]]) -> None:
    """The modality's explainer: a plot when it draws one, findings in words when it gives
    ``(findings, attributions)`` (EHR, tabular)."""
    card = package.card
    plot = getattr(explainer, "plot", None)
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            tensor = modality.item_tensor(split.inputs[case["index"]], card.preprocessing)
            sample = Sample(id=case["id"], tensor=tensor)
            attribution = explainer.explain(sample, case["explain_class"])
            target = card.task.class_names[case["explain_class"]]
            if isinstance(attribution, tuple):
                findings, attribution = attribution
                case["findings"] = [str(f) for f in findings][:6]
            if plot is not None:
                path = Path(tmp) / f"{case['index']}.png"
                plot(sample, attribution, path)
                case["image"] = base64.b64encode(path.read_bytes()).decode("ascii")
                averaged = _averaged(explainer)
                case["image_caption"] = (f"attribution of the input to '{target}'"
                                         + (f" ({averaged})" if averaged else ""))
            elif "findings" not in case:
                case["image_note"] = "the modality's explainer draws no picture"


def attach_explanations(package: Any, modality: Any, split: Any, cases: list[dict[str, Any]],
                        layer: str | None = None, method: str = "gradcam") -> None:
    """Add ``image`` (base64 PNG) and ``image_caption`` to each case, or ``image_note`` saying
    why there is no picture. Never raises for a modality without an explainer."""
    if not cases:
        return
    try:
        explainer = _explainer(package, modality, layer, method)
        if hasattr(explainer, "explain_batch") and hasattr(explainer, "overlay_png"):
            _heatmap_pictures(explainer, package, modality, split, cases, method)
        else:
            _other_pictures(explainer, package, modality, split, cases)
    except (MeddxError, NotImplementedError, RuntimeError, ValueError, TypeError,
            AttributeError) as e:
        # an explainer that fails must not take the whole evaluation down with it
        logger.warning("error gallery without pictures: %s", e)
        for case in cases:
            case.pop("image", None)
            case["image_note"] = f"no explanation available ({type(e).__name__}: {e})"
