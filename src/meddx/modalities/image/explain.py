"""Grad-CAM and Grad-CAM++ heat maps for 2D and 3D image models (monai.visualize).

The map is computed in fp32 with autocast off (Grad-CAM's gradients fail under bf16 autocast),
on a private copy of the network (MONAI registers hooks that stay on the module and turns
in-place ReLUs off; the caller's model is never touched). The target layer is configurable; by
default it is the network builder's ``gradcam_layer`` when that layer's map is at least 4 voxels
per side, else the deepest block whose map keeps at least 7 per side (a 4×4 map at 28 px is a
blur, not an explanation).

* :func:`explain_image`: the map on the input grid, 0..1.
* :func:`overlay_png`: PNG bytes of the image with the map blended over it (3D: mid-slices in
  the three planes side by side).
* :class:`ImageExplainer`: the object ``ImageModality.explainer`` returns
  (``explain(sample, class_index)``, ``plot(sample, attribution, path)``).
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddx.errors import ConfigError, DataError

__all__ = [
    "ImageExplainer",
    "explain_image",
    "overlay_png",
    "preview_png",
    "mid_slices",
    "default_layer",
    "METHODS",
]

logger = logging.getLogger(__name__)

METHODS = ("gradcam", "gradcampp")
_MIN_SIDE = 7


class _ClassScores(torch.nn.Module):
    """Per-class scores in ``class_names`` order from a network's raw outputs.

    Binary tasks have one logit z: the positive class scores z, the other -z. Ordinal tasks
    score the log class probability; multiclass and multilabel use the logits themselves.
    """

    def __init__(self, net: torch.nn.Module, task: Any | None) -> None:
        super().__init__()
        self.net = net
        self.task = task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x).float()
        task = self.task
        if task is None:
            return z
        if task.kind == "binary":
            z = z.reshape(-1, 1)
            pos = task.positive_index
            return torch.cat([z, -z], dim=1) if pos == 0 else torch.cat([-z, z], dim=1)
        if task.kind == "ordinal":
            return torch.log(task.probabilities(z).clamp_min(1e-8))
        return z


def _as_batch(tensor: Any, spatial_dims: int | None = None) -> torch.Tensor:
    x = tensor.tensor if hasattr(tensor, "tensor") else tensor
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    dims = spatial_dims if spatial_dims is not None else x.ndim - 1
    if x.ndim == dims + 1:
        x = x.unsqueeze(0)
    if x.ndim != dims + 2 or x.shape[0] != 1:
        raise DataError(f"Grad-CAM takes one image (C, *spatial), got shape {tuple(x.shape)}")
    return x.contiguous()


def _spatial_dims(net: torch.nn.Module) -> int | None:
    """2 or 3 from the network's first convolution (None if it has none)."""
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.Conv3d | torch.nn.Conv1d):
            return {torch.nn.Conv1d: 1, torch.nn.Conv2d: 2, torch.nn.Conv3d: 3}[type(m)]
    return None


def _block_outputs(net: torch.nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """Spatial shape of every module at depth ≤ 2 for input ``x``, in forward order."""
    seen: list[tuple[str, tuple[int, ...]]] = []
    hooks = []
    for name, mod in net.named_modules():
        if not name or name.count(".") > 1:
            continue

        def hook(_m: Any, _i: Any, out: Any, name: str = name) -> None:
            if isinstance(out, torch.Tensor) and out.ndim == x.ndim:
                seen.append((name, tuple(out.shape[2:])))

        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def default_layer(net: torch.nn.Module, x: torch.Tensor, preferred: str | None = None) -> str:
    """The Grad-CAM target layer for ``net`` on inputs shaped like ``x``.

    Args:
        net: the network (not the class-score wrapper).
        x: an example batch (1, C, *spatial).
        preferred: the builder's ``gradcam_layer``; kept when its map is ≥ 4 per side.
    """
    shapes = _block_outputs(net, x)
    by_name = dict(shapes)
    if preferred and preferred in by_name and min(by_name[preferred]) >= 4:
        return preferred
    need = min(_MIN_SIDE, min(x.shape[2:]))
    good = [n for n, s in shapes if min(s) >= need and s != tuple(x.shape[2:])]
    if not good:
        good = [n for n, s in shapes if min(s) >= need]
    if not good:
        raise ConfigError("no layer of this network keeps a spatial map for Grad-CAM",
                          hint="pass layer=… naming a convolutional block")
    if preferred:
        logger.info("Grad-CAM: %s gives a map of %s; using %s instead", preferred,
                    by_name.get(preferred), good[-1])
    return good[-1]


def _builder_layer(network: str | None, spec: dict[str, Any]) -> str | None:
    if not network:
        return None
    from meddx.modalities.networks import network_builder

    layer = getattr(network_builder(network), "gradcam_layer", None)
    return layer(spec) if callable(layer) else layer


def explain_image(model: torch.nn.Module, tensor: Any, class_index: int | None = None,
                  layer: str | None = None, method: str = "gradcam", task: Any | None = None,
                  ) -> np.ndarray:
    """Grad-CAM (or Grad-CAM++) map of one image, on the input grid, scaled to 0..1.

    Args:
        model: the image network (fp32; it is copied, never modified).
        tensor: one image (C, H, W) / (C, D, H, W), or a batch of one, or a Sample.
        class_index: class in ``class_names`` order (None: the top-scoring class).
        layer: target layer name (default: see :func:`default_layer`).
        method: ``gradcam`` or ``gradcampp``.
        task: the TaskSpec (maps class indices to logits; needed for binary and ordinal).

    Returns:
        (H, W) or (D, H, W) float32 map.
    """
    return ImageExplainer(model, None, task=task, layer=layer, method=method).explain(
        tensor, class_index)


class ImageExplainer:
    """Grad-CAM explainer for image models (returned by ``ImageModality.explainer``).

    Args:
        model: the fp32 image network (copied; the caller's module is never hooked).
        input_spec: the card's ``preprocessing`` (spatial_dims, channels, size) or None.
        task: the TaskSpec, so that class indices follow ``class_names``.
        network: registry name of the network (its builder's ``gradcam_layer`` is preferred).
        layer: explicit target layer.
        method: ``gradcam`` or ``gradcampp``.
    """

    def __init__(self, model: torch.nn.Module, input_spec: dict[str, Any] | None = None, *,
                 task: Any | None = None, network: str | None = None, layer: str | None = None,
                 method: str = "gradcam", **_: Any) -> None:
        if method not in METHODS:
            raise ConfigError(f"unknown explanation method '{method}'; choose gradcam or gradcampp")
        self.input_spec = dict(input_spec or {})
        self.task = task
        self.method = method
        self.layer = layer
        self.network = network
        net = copy.deepcopy(model).float().eval().to(memory_format=torch.contiguous_format)
        for p in net.parameters():
            p.requires_grad_(True)
        self._scores = _ClassScores(net, task)
        self._cam: Any = None
        self.input_spec.setdefault("spatial_dims", _spatial_dims(net))

    def _setup(self, x: torch.Tensor) -> None:
        from monai.visualize import GradCAM, GradCAMpp

        net = self._scores.net
        names = [n for n, _ in net.named_modules()]
        if self.layer is None:
            spec = {"spatial_dims": x.ndim - 2, "in_channels": x.shape[1],
                    "size": int(x.shape[-1])}
            self.layer = default_layer(net, x, _builder_layer(self.network, spec))
        elif self.layer not in names:
            raise ConfigError(f"network has no layer '{self.layer}'",
                              hint="top-level layers: " + ", ".join(n for n in names if n and "." not in n))
        cls = GradCAMpp if self.method == "gradcampp" else GradCAM
        # MONAI's default post-processing maps (min, max) to (1, 0), flipping the map; keep
        # the raw map and scale it to 0..1 ourselves
        self._cam = cls(nn_module=self._scores, target_layers=f"net.{self.layer}",
                        postprocessing=_identity)

    def explain(self, sample: Any, class_index: int | None = None) -> np.ndarray:
        """The heat map of ``sample`` (a Sample, tensor or array) for ``class_index``."""
        x = _as_batch(sample, self.input_spec.get("spatial_dims"))
        return self.explain_batch(x, class_index)[0]

    def top_class(self, sample: Any) -> int:
        """The network's top-scoring class (``class_names`` order) for one image."""
        x = _as_batch(sample, self.input_spec.get("spatial_dims"))
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            return int(self._scores(x).argmax(dim=1)[0])

    def explain_batch(self, x: torch.Tensor, class_index: int | None = None) -> np.ndarray:
        """Maps (B, *spatial) for a batch (B, C, *spatial), all for one class (None: each
        image's top class)."""
        x = torch.as_tensor(x).float().contiguous()
        if self._cam is None:
            self._setup(x[:1])
        with torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast("cpu", enabled=False):
            if class_index is not None and self.task is None and self._width(x) == 1:
                # a one-logit (binary) network explained without its task: the only score
                # there is, the positive class's
                class_index = 0
            if class_index is None:
                with torch.no_grad():
                    top = self._scores(x).argmax(dim=1)
                return np.concatenate([self.explain_batch(x[i:i + 1], int(top[i]))
                                       for i in range(len(x))])
            with warnings.catch_warnings():
                # a first-layer target has no input gradient; torch warns, the map is right
                warnings.filterwarnings("ignore", message="Full backward hook")
                cam = self._cam(x, class_idx=int(class_index))
        return np.stack([_unit(m) for m in cam.detach().float().numpy()[:, 0]])

    def _width(self, x: torch.Tensor) -> int:
        if not hasattr(self, "_n_out"):
            with torch.no_grad():
                self._n_out = int(self._scores(x[:1]).shape[1])
        return self._n_out

    def overlay_png(self, sample: Any, attribution: np.ndarray) -> bytes:
        """PNG bytes of ``attribution`` blended over ``sample`` (what the service returns)."""
        return overlay_png(_as_batch(sample, self.input_spec.get("spatial_dims"))[0], attribution)

    def preview_png(self, sample: Any) -> bytes | None:
        """The model's view of a 2D input as a PNG (what the heat map is drawn over)."""
        return preview_png(getattr(sample, "tensor", sample))

    def plot(self, sample: Any, attribution: np.ndarray, path: str | Path) -> Path:
        """Write the overlay PNG of ``sample`` with ``attribution`` to ``path``."""
        x = _as_batch(sample, self.input_spec.get("spatial_dims"))[0].numpy()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(overlay_png(x, attribution))
        return out


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _unit(m: np.ndarray) -> np.ndarray:
    m = np.nan_to_num(m, nan=0.0)
    lo, hi = float(m.min()), float(m.max())
    return ((m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)).astype(np.float32)


def mid_slices(volume: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal and sagittal mid-slices of a (D, H, W) or (C, D, H, W) volume."""
    v = np.asarray(volume)
    d, h, w = v.shape[-3:]
    return [v[..., d // 2, :, :], v[..., :, h // 2, :], v[..., :, :, w // 2]]


def _display(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) floats in 0..1 from a (C, H, W) / (H, W) image of any range."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3:
        img = img[0] if img.shape[0] not in (3,) else np.moveaxis(img, 0, -1)
    lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0.0, 1.0)
    img = np.clip((img - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(img)
    return np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img


def _blend(image: np.ndarray, cam: np.ndarray, cmap: str, alpha: float) -> np.ndarray:
    import matplotlib

    base = _display(image)
    heat = matplotlib.colormaps[cmap](np.clip(np.nan_to_num(cam), 0, 1))[..., :3]
    if heat.shape[:2] != base.shape[:2]:
        raise DataError(f"map {cam.shape} does not fit image {base.shape[:2]}")
    # weight the colour by the map, so regions the model ignored show the plain image
    w = alpha * np.clip(np.nan_to_num(cam), 0, 1)[..., None] ** 0.5
    return (1 - w) * base + w * heat


def overlay_png(image: Any, cam: np.ndarray, cmap: str = "jet", alpha: float = 0.45,
                min_side: int = 224) -> bytes:
    """PNG bytes of ``cam`` (0..1, on the image grid) blended over ``image``.

    Args:
        image: (C, H, W) or (H, W) for 2D; (C, D, H, W) or (D, H, W) for 3D (``cam`` (D, H, W)),
            shown as three mid-slices side by side.
        cam: the map from :func:`explain_image`.
        cmap: a matplotlib colormap (``jet``, ``inferno`` …).
        alpha: weight of the heat map.
        min_side: small images are enlarged (nearest neighbour) to at least this many pixels.
    """
    from PIL import Image

    img = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim == 3:
        vol = img if img.ndim == 4 else img[None]
        panels = [_blend(a[0] if a.ndim == 3 else a, c, cmap, alpha)
                  for a, c in zip(mid_slices(vol), mid_slices(cam), strict=True)]
        height = max(p.shape[0] for p in panels)
        padded = [np.pad(p, ((0, height - p.shape[0]), (0, 2), (0, 0)), constant_values=1.0)
                  for p in panels]
        rgb = np.concatenate(padded, axis=1)
    else:
        rgb = _blend(img, cam, cmap, alpha)
    pil = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    scale = max(1, int(np.ceil(min_side / max(1, min(pil.size)))))
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def preview_png(tensor: Any) -> bytes | None:
    """The model's view of a 2D input as a PNG (what the heat map is drawn over)."""
    from PIL import Image

    x = np.asarray(tensor.numpy() if hasattr(tensor, "numpy") else tensor, dtype=np.float32)
    if x.ndim == 3 and x.shape[0] in (1, 3):
        x = x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1)
    if x.ndim not in (2, 3):
        return None
    lo, hi = float(x.min()), float(x.max())
    x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    im = Image.fromarray((x * 255).astype(np.uint8))
    scale = max(1, 224 // max(1, min(im.size)))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
