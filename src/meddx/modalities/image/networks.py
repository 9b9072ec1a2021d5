"""Image networks (2D and 3D) over monai.networks.

The ResNet stem follows the input: for small 2D inputs (≤ 64 px) a 3×3 stride-1 stem without
max-pool (MedMNIST's "ResNet (28)"), otherwise the standard 7×7 stride-2 stem with max-pool;
3D always uses the strided stem, since the full-resolution stem costs ~10× the time.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks import nets

from meddx.errors import ConfigError
from meddx.modalities.networks import network

__all__ = ["resnet18", "resnet34", "resnet50", "densenet121", "efficientnet_b0"]


def _example(spec: dict[str, Any], batch: int) -> torch.Tensor:
    size = spec["size"]
    shape = (batch, spec["in_channels"], *([size] * spec["spatial_dims"]))
    return torch.randn(shape)


def _small_stem(spatial_dims: int, size: int | None) -> bool:
    return spatial_dims == 2 and size is not None and size <= 64


def _resnet_layer(spec: dict[str, Any]) -> str:
    # layer3 keeps a map larger than 4×4 at 28 px with the small stem; layer4 for strided stems
    return "layer3" if _small_stem(spec["spatial_dims"], spec.get("size")) else "layer4"


_EX2D = {"spatial_dims": 2, "in_channels": 1, "size": 16}  # small stem; kept tiny for tests


def _resnet(block: str, layers: list[int], spatial_dims: int, in_channels: int, num_outputs: int,
            size: int | None, small_stem: bool | None = None, widen_factor: float = 1.0,
            dropout: float = 0.0, **extra: Any) -> torch.nn.Module:
    if extra:
        raise ConfigError(f"unknown ResNet options: {sorted(extra)}")
    if spatial_dims not in (1, 2, 3):
        raise ConfigError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
    small = _small_stem(spatial_dims, size) if small_stem is None else small_stem
    model = nets.ResNet(
        block=block,
        layers=layers,
        block_inplanes=[64, 128, 256, 512],
        spatial_dims=spatial_dims,
        n_input_channels=in_channels,
        conv1_t_size=3 if small else 7,
        conv1_t_stride=1 if small else 2,
        no_max_pool=small,
        widen_factor=widen_factor,
        num_classes=num_outputs,
    )
    if dropout:
        model.fc = torch.nn.Sequential(torch.nn.Dropout(dropout), model.fc)
    return model


@network(modality="image", example_spec=_EX2D, example_input=_example, gradcam_layer=_resnet_layer)
def resnet18(*, spatial_dims: int, in_channels: int, num_outputs: int, size: int | None = None,
             **options: Any) -> torch.nn.Module:
    """ResNet-18 (basic blocks 2-2-2-2)."""
    return _resnet("basic", [2, 2, 2, 2], spatial_dims, in_channels, num_outputs, size, **options)


@network(modality="image", example_spec=_EX2D, example_input=_example, gradcam_layer=_resnet_layer)
def resnet34(*, spatial_dims: int, in_channels: int, num_outputs: int, size: int | None = None,
             **options: Any) -> torch.nn.Module:
    """ResNet-34 (basic blocks 3-4-6-3)."""
    return _resnet("basic", [3, 4, 6, 3], spatial_dims, in_channels, num_outputs, size, **options)


@network(modality="image", example_spec=_EX2D, example_input=_example, gradcam_layer=_resnet_layer)
def resnet50(*, spatial_dims: int, in_channels: int, num_outputs: int, size: int | None = None,
             **options: Any) -> torch.nn.Module:
    """ResNet-50 (bottleneck blocks 3-4-6-3)."""
    return _resnet("bottleneck", [3, 4, 6, 3], spatial_dims, in_channels, num_outputs, size,
                   **options)


def _require_size(name: str, size: int | None, minimum: int) -> None:
    if size is None or size < minimum:
        raise ConfigError(
            f"model '{name}' needs inputs of at least {minimum} px, got {size}",
            hint=f"its down-sampling collapses smaller inputs to nothing (MONAI's {name} fails); "
            "use resnet18 for small images, or a larger dataset size (--size 64/128/224)",
        )


_EX_LARGE = {"spatial_dims": 2, "in_channels": 3, "size": 64}


@network(modality="image", example_spec=_EX_LARGE, example_input=_example,
         gradcam_layer="features.denseblock4")
def densenet121(*, spatial_dims: int, in_channels: int, num_outputs: int, size: int | None = None,
                dropout: float = 0.0) -> torch.nn.Module:
    """DenseNet-121 (MONAI), never pretrained (nothing downloads at run time)."""
    _require_size("densenet121", size, 32)
    return nets.DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels,
                            out_channels=num_outputs, pretrained=False, dropout_prob=dropout)


@network(modality="image", example_spec=_EX_LARGE, example_input=_example,
         gradcam_layer="_blocks.15")
def efficientnet_b0(*, spatial_dims: int, in_channels: int, num_outputs: int,
                    size: int | None = None) -> torch.nn.Module:
    """EfficientNet-B0 (MONAI), built with ``pretrained=False`` (MONAI would otherwise download)."""
    _require_size("efficientnet_b0", size, 32)
    return nets.EfficientNetBN("efficientnet-b0", pretrained=False, progress=False,
                               spatial_dims=spatial_dims, in_channels=in_channels,
                               num_classes=num_outputs)
