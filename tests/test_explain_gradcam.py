"""Grad-CAM: the map points where the evidence is, runs in fp32, 2D and 3D, overlays render."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from meddx.errors import ConfigError
from meddx.modalities.image.explain import ImageExplainer, explain_image, overlay_png
from meddx.models import build_network
from meddx.tasks import TaskSpec

BINARY = TaskSpec(kind="binary", class_names=["lesion", "clear"], positive_class="lesion")


class _BlobNet(torch.nn.Module):
    """Positive filters, global pooling: the evidence for class 0 is the bright input region."""

    def __init__(self, dims: int = 2, outputs: int = 2) -> None:
        super().__init__()
        conv = torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d
        self.features = conv(1, 4, 3, padding=1)
        torch.nn.init.constant_(self.features.weight, 0.1)
        torch.nn.init.zeros_(self.features.bias)
        self.act = torch.nn.ReLU()
        self.fc = torch.nn.Linear(4, outputs)
        torch.nn.init.constant_(self.fc.weight, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.features(x)).flatten(2).mean(-1))


def _blob(dims: int) -> torch.Tensor:
    x = 0.01 * torch.rand((1, 1) + (16,) * dims)
    x[(0, 0) + (slice(2, 6),) * dims] = 1.0
    return x


@pytest.mark.parametrize("dims", [2, 3])
def test_map_peaks_where_the_evidence_is(dims):
    x = _blob(dims)
    cam = explain_image(_BlobNet(dims), x, class_index=0, layer="features")
    assert cam.shape == (16,) * dims and cam.min() >= 0 and cam.max() == pytest.approx(1.0)
    inside = cam[(slice(2, 6),) * dims].mean()
    far = cam[(slice(10, 16),) * dims].mean()
    assert inside > 0.5 and far < 0.1  # not flipped (MONAI's default normaliser flips it)


def test_binary_single_logit_classes_and_gradcampp():
    net = _BlobNet(outputs=1)
    x = _blob(2)
    pos = explain_image(net, x, class_index=0, layer="features", task=BINARY)
    assert pos[2:6, 2:6].mean() > 0.5 > pos[10:, 10:].mean()
    # the other class of a one-logit model scores -z: its evidence is the same region, negated
    neg = explain_image(net, x, class_index=1, layer="features", task=BINARY)
    assert neg.max() < 0.5 or neg[2:6, 2:6].mean() < pos[2:6, 2:6].mean()
    pp = explain_image(net, x, class_index=0, layer="features", task=BINARY, method="gradcampp")
    assert pp.shape == (16, 16)
    with pytest.raises(ConfigError):
        explain_image(net, x, 0, layer="nope")
    with pytest.raises(ConfigError):
        explain_image(net, x, 0, method="lime")


def test_default_layer_is_not_a_4x4_blur_and_model_is_untouched():
    torch.manual_seed(0)
    net = build_network("resnet18", num_outputs=1,
                        spec={"spatial_dims": 2, "in_channels": 1, "size": 28},
                        options={"widen_factor": 0.25})
    spec = {"spatial_dims": 2, "channels": 1, "size": 28}
    ex = ImageExplainer(net, spec, task=BINARY, network="resnet18")
    x = torch.rand(1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the caller's autocast must not leak in
        cam = ex.explain(x, 0)
    assert ex.layer == "layer3" and cam.shape == (28, 28) and np.isfinite(cam).all()
    assert len(np.unique(cam.round(3))) > 16  # a 7×7 map upsampled, not a constant
    assert all(not m._forward_hooks and not m._backward_hooks for m in net.modules())
    # without the builder's name the probe finds the same layer
    assert ImageExplainer(net, spec, task=BINARY)._setup(x[None]) is None


def test_overlay_png_2d_and_3d():
    img2 = np.random.default_rng(0).random((1, 28, 28)).astype(np.float32)
    png = overlay_png(img2, np.random.default_rng(1).random((28, 28)))
    im = Image.open(io.BytesIO(png))
    assert im.format == "PNG" and min(im.size) >= 224
    vol = np.random.default_rng(0).random((1, 12, 14, 16))
    im3 = Image.open(io.BytesIO(overlay_png(vol, np.random.default_rng(2).random((12, 14, 16)))))
    assert im3.width > 2.5 * im3.height  # three planes side by side
