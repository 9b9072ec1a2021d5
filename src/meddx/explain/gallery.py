"""Pictures for the report's error gallery: Grad-CAM overlays for images, the modality's own
explainer plot for other inputs (ECG, sequence, molecule, EHR), or none with a reason."""

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


def _image_pictures(package: Any, modality: Any, split: Any, cases: list[dict[str, Any]],
                    layer: str | None, method: str) -> None:
    from meddx.explain.gradcam import ImageExplainer, overlay_png

    card = package.card
    explainer = ImageExplainer(package.build_model(), card.preprocessing, task=card.task,
                               network=card.network.get("name"), layer=layer, method=method)
    by_class: dict[int, list[dict[str, Any]]] = {}
    for case in cases:
        by_class.setdefault(case["explain_class"], []).append(case)
    for k, group in by_class.items():  # one batched Grad-CAM per explained class
        xs = torch.stack([torch.as_tensor(modality.item_tensor(split.inputs[c["index"]],
                                                               card.preprocessing))
                          for c in group]).float()
        cams = explainer.explain_batch(xs, k)
        for case, x, cam in zip(group, xs, cams, strict=True):
            case["image"] = base64.b64encode(overlay_png(x, cam)).decode("ascii")
            case["image_caption"] = (f"{'Grad-CAM++' if method == 'gradcampp' else 'Grad-CAM'} "
                                     f"for '{card.task.class_names[k]}' (layer {explainer.layer})")


def _other_pictures(package: Any, modality: Any, split: Any, cases: list[dict[str, Any]]) -> None:
    """The modality's explainer: a plot when it draws one, findings in words when it gives
    ``(findings, attributions)`` (EHR, tabular)."""
    card = package.card
    model = package.build_model()
    try:
        explainer = modality.explainer(model, card.preprocessing, task=card.task)
    except TypeError:  # an explainer that takes no task (class indices are its own)
        explainer = modality.explainer(model, card.preprocessing)
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
                case["image_caption"] = f"attribution of the input to '{target}'"
            elif "findings" not in case:
                case["image_note"] = "the modality's explainer draws no picture"


def attach_explanations(package: Any, modality: Any, split: Any, cases: list[dict[str, Any]],
                        layer: str | None = None, method: str = "gradcam") -> None:
    """Add ``image`` (base64 PNG) and ``image_caption`` to each case, or ``image_note`` saying
    why there is no picture. Never raises for a modality without an explainer."""
    if not cases:
        return
    try:
        if package.card.modality == "image":
            _image_pictures(package, modality, split, cases, layer, method)
        else:
            _other_pictures(package, modality, split, cases)
    except (MeddxError, NotImplementedError, RuntimeError, ValueError, TypeError,
            AttributeError) as e:
        # an explainer that fails must not take the whole evaluation down with it
        logger.warning("error gallery without pictures: %s", e)
        for case in cases:
            case.pop("image", None)
            case["image_note"] = f"no explanation available ({type(e).__name__}: {e})"
