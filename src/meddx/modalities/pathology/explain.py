"""Explaining a slide prediction: ABMIL attention (or tile probabilities) over the thumbnail,
and a gallery of the tiles that weighed most.

Tile coordinates are level-0 pixels; the thumbnail is drawn from a low pyramid level (never
the file's label or macro image). Attention is shown by rank (percentile over the slide's
tiles), since its raw values shrink with the number of tiles.
"""

from __future__ import annotations

import copy
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddx.errors import ConfigError

__all__ = ["SlideExplainer", "heatmap_image", "gallery_image", "rank01", "tile_map"]

logger = logging.getLogger(__name__)

THUMB_SIDE = 1024


def rank01(values: np.ndarray) -> np.ndarray:
    """Values → their percentile rank in [0, 1] (ties share a rank)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return np.ones_like(v)
    order = v.argsort(kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v))
    _, inv = np.unique(v, return_inverse=True)
    sums = np.bincount(inv, weights=ranks) / np.bincount(inv)
    return sums[inv] / (len(v) - 1)


def _thumbnail(bag: Any) -> np.ndarray | None:
    if not getattr(bag, "slide", None):
        return None
    from meddx.modalities.pathology.slide import open_slide

    try:
        with open_slide(bag.slide, mpp=bag.mpp) as slide:
            return slide.thumbnail(THUMB_SIDE)
    except Exception as e:  # noqa: BLE001 - a picture without its slide is still drawn
        logger.warning("no thumbnail for the heat map: %s", e)
        return None


def heatmap_image(bag: Any, scores: np.ndarray, thumbnail: np.ndarray | None = None,
                  alpha: float = 0.5) -> np.ndarray:
    """``scores`` (one per tile, in [0, 1]) as a colour map over the slide's thumbnail →
    ``(h, w, 3)`` uint8. Without a thumbnail the tiles are drawn on white."""
    from matplotlib import colormaps

    w0, h0 = bag.slide_dimensions
    if thumbnail is None:
        scale = THUMB_SIDE / max(w0, h0)
        thumbnail = np.full((max(1, round(h0 * scale)), max(1, round(w0 * scale)), 3), 255,
                            np.uint8)
    h, w = thumbnail.shape[:2]
    sx, sy = w / w0, h / h0
    heat = np.zeros((h, w), np.float32)
    seen = np.zeros((h, w), bool)
    side = bag.level0_size
    for (x, y), s in zip(np.asarray(bag.coords), np.asarray(scores), strict=True):
        x0, y0 = int(x * sx), int(y * sy)
        x1, y1 = max(x0 + 1, int((x + side) * sx)), max(y0 + 1, int((y + side) * sy))
        heat[y0:y1, x0:x1] = np.maximum(heat[y0:y1, x0:x1], s)
        seen[y0:y1, x0:x1] = True
    colour = (colormaps["inferno"](heat)[..., :3] * 255).astype(np.float32)
    out = thumbnail.astype(np.float32)
    out[seen] = (1 - alpha) * out[seen] + alpha * colour[seen]
    return out.clip(0, 255).astype(np.uint8)


def tile_map(bag: Any, scores: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Per-tile ``scores`` (any scale) ranked into [0, 1] and drawn as an ``(H, W)`` float32
    map covering the whole slide at ``shape`` (rows, columns); no tile: 0."""
    h, w = (int(v) for v in shape)
    w0, h0 = bag.slide_dimensions
    if h < 1 or w < 1 or w0 < 1 or h0 < 1:
        raise ConfigError(f"cannot draw tiles on a {h}x{w} map of a {w0}x{h0} slide")
    sx, sy = w / w0, h / h0
    out = np.zeros((h, w), np.float32)
    side = bag.level0_size
    for (x, y), s in zip(np.asarray(bag.coords), rank01(np.asarray(scores)), strict=True):
        x0, y0 = int(x * sx), int(y * sy)
        x1, y1 = max(x0 + 1, int(round((x + side) * sx))), max(y0 + 1, int(round((y + side) * sy)))
        out[y0:y1, x0:x1] = np.maximum(out[y0:y1, x0:x1], s)
    return out


def gallery_image(bag: Any, scores: np.ndarray, k: int = 8, tile_px: int = 128,
                  tile_mpp: float | None = None) -> np.ndarray | None:
    """The ``k`` highest-scoring tiles read from the slide, side by side (``None`` when the
    slide cannot be read)."""
    if not getattr(bag, "slide", None) or len(bag) == 0:
        return None
    from PIL import Image

    from meddx.modalities.pathology.slide import open_slide

    top = np.argsort(-np.asarray(scores), kind="stable")[:k]
    tiles = []
    try:
        with open_slide(bag.slide, mpp=bag.mpp) as slide:
            mpp = tile_mpp or bag.level0_size * slide.mpp / tile_px
            for i in top:
                x, y = (int(v) for v in bag.coords[i])
                side = max(1, round(bag.level0_size * slide.mpp / mpp))
                t = slide.read_at_mpp((x, y), mpp, side)
                tiles.append(np.asarray(Image.fromarray(t).resize((tile_px, tile_px))))
    except Exception as e:  # noqa: BLE001 - the heat map stands without the gallery
        logger.warning("no tile gallery: %s", e)
        return None
    pad = np.full((tile_px, 4, 3), 255, np.uint8)
    return np.concatenate([x for t in tiles for x in (t, pad)][:-1], axis=1)


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


class SlideExplainer:
    """Per-tile attention (or tile probability) of an ABMIL slide model.

    Args:
        model: the slide network (copied; the caller's module is never touched).
        input_spec: the card's preprocessing.
        task: the task (for tile probabilities).
        score: ``attention`` (default) or ``probability`` (the classifier on each tile alone).
        top_k: tiles in the gallery.
    """

    def __init__(self, model: torch.nn.Module, input_spec: dict[str, Any], task: Any = None,
                 score: str = "attention", top_k: int = 8) -> None:
        if not hasattr(model, "attend"):
            raise ConfigError("this slide network has no attention to explain with",
                              hint="train the abmil network")
        if score not in ("attention", "probability"):
            raise ConfigError(f"score must be 'attention' or 'probability', got {score!r}")
        self.model = copy.deepcopy(model).eval().float()
        self.input_spec, self.task, self.score, self.top_k = input_spec, task, score, top_k

    @torch.inference_mode()
    def explain(self, sample: Any, class_index: int | None = None) -> np.ndarray:
        """One score per tile of the whole bag, ``(N,)``: attention weights (sum 1) or, with
        ``score="probability"``, each tile's probability of ``class_index``."""
        bag = getattr(sample, "tensor", sample)
        x = bag.features[None].float()
        if self.score == "attention":
            return self.model.attend(x)[1][0].numpy().astype(np.float64)
        z = self.model.tile_logits(x)[0]
        if self.task is None:
            return torch.sigmoid(z[:, 0]).numpy()
        probs = self.task.probabilities(z).numpy()
        return probs[:, class_index if class_index is not None else -1]

    def tile_probabilities(self, sample: Any, class_index: int) -> np.ndarray:
        """Each tile's probability of ``class_index`` when classified alone."""
        saved, self.score = self.score, "probability"
        try:
            return self.explain(sample, class_index)
        finally:
            self.score = saved

    def heatmap_png(self, sample: Any, attribution: np.ndarray) -> bytes:
        """The heat map over the thumbnail as PNG bytes."""
        bag = getattr(sample, "tensor", sample)
        return _png(heatmap_image(bag, rank01(attribution), _thumbnail(bag)))

    def gallery_png(self, sample: Any, attribution: np.ndarray) -> bytes | None:
        """The top-k tiles as PNG bytes (None when the slide is not at hand)."""
        g = gallery_image(getattr(sample, "tensor", sample), attribution, self.top_k)
        return None if g is None else _png(g)

    def plot(self, sample: Any, attribution: np.ndarray, path: str | Path,
             title: str | None = None) -> Path:
        """Heat map over the thumbnail, and beneath it the top-k tiles, as one PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        bag = getattr(sample, "tensor", sample)
        heat = heatmap_image(bag, rank01(attribution), _thumbnail(bag))
        gallery = gallery_image(bag, attribution, self.top_k)
        rows = 2 if gallery is not None else 1
        fig, axes = plt.subplots(rows, 1, figsize=(7, 7 if rows == 2 else 5.5),
                                 gridspec_kw={"height_ratios": [4, 1][:rows]}, squeeze=False)
        axes[0, 0].imshow(heat)
        what = "attention" if self.score == "attention" else "tile probability"
        axes[0, 0].set_title(title or f"{what} by rank over {len(bag)} tiles", fontsize=9)
        if gallery is not None:
            axes[1, 0].imshow(gallery)
            axes[1, 0].set_title(f"top {min(self.top_k, len(bag))} tiles by {what}", fontsize=9)
        for ax in axes.ravel():
            ax.axis("off")
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out

    def summary(self, sample: Any, attribution: np.ndarray) -> dict[str, Any]:
        """The top tiles' level-0 coordinates and scores."""
        bag = getattr(sample, "tensor", sample)
        top = np.argsort(-np.asarray(attribution), kind="stable")[: self.top_k]
        return {"method": self.score, "tile_side_level0": int(bag.level0_size),
                "top_tiles": [{"x": int(bag.coords[i][0]), "y": int(bag.coords[i][1]),
                               "score": round(float(attribution[i]), 6)} for i in top]}
