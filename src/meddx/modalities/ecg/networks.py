"""Waveform networks (ECG): a 1D ResNet over monai.networks and a CNN + bidirectional GRU.

Both take ``(batch, leads, samples)`` and emit ``num_outputs`` logits. The ResNet uses a
strided stem (a wide kernel, stride 2, then max-pool): the full-resolution stem sees every
sample at full width and trains about 4× slower on a CPU for no gain in accuracy on 300 Hz
single-lead ECG. Widths are small (32-64-128-256 by default) for the same reason.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks import nets
from torch import nn

from meddx.errors import ConfigError
from meddx.modalities.networks import network

__all__ = ["resnet1d", "cnn_gru", "CNNGRU"]

_EX1D = {"spatial_dims": 1, "in_channels": 1, "size": None, "length": 1500}


def _example(spec: dict[str, Any], batch: int) -> torch.Tensor:
    return torch.randn(batch, spec["in_channels"], spec.get("length") or 1500)


def _check_1d(name: str, spatial_dims: int, extra: dict[str, Any]) -> None:
    if spatial_dims != 1:
        raise ConfigError(f"model '{name}' is for waveforms (spatial_dims=1), got {spatial_dims}")
    if extra:
        raise ConfigError(f"unknown {name} options: {sorted(extra)}")


@network(modality="ecg", example_spec=_EX1D, example_input=_example, gradcam_layer="layer4")
def resnet1d(*, spatial_dims: int = 1, in_channels: int, num_outputs: int,
             size: int | None = None, length: int | None = None,
             layers: list[int] | None = None, widths: list[int] | None = None,
             block: str = "basic", stem_kernel: int = 15, stem_stride: int = 2,
             dropout: float = 0.2, **extra: Any) -> nn.Module:
    """1D ResNet (MONAI ``ResNet`` with ``spatial_dims=1``) with a strided stem.

    Args:
        in_channels: number of leads.
        num_outputs: logits (``TaskSpec.num_outputs``).
        length: samples per window (only checked: the network is length-agnostic).
        layers: blocks per stage (default 2-2-2-2, ResNet-18's layout).
        widths: channels per stage (default 32-64-128-256).
        block: ``basic`` or ``bottleneck``.
        stem_kernel / stem_stride: the first convolution; a max-pool (stride 2) follows.
        dropout: before the last linear layer.
    """
    _check_1d("resnet1d", spatial_dims, extra)
    layers = list(layers or [2, 2, 2, 2])
    widths = list(widths or [32, 64, 128, 256])
    if len(layers) != 4 or len(widths) != 4:
        raise ConfigError("resnet1d needs four stages: layers and widths of length 4")
    if length is not None and length < 32 * stem_stride:
        raise ConfigError(f"resnet1d needs windows of at least {32 * stem_stride} samples, "
                          f"got {length}")
    model = nets.ResNet(
        block=block, layers=layers, block_inplanes=widths, spatial_dims=1,
        n_input_channels=in_channels, conv1_t_size=stem_kernel, conv1_t_stride=stem_stride,
        no_max_pool=False, num_classes=num_outputs,
    )
    if dropout:
        model.fc = nn.Sequential(nn.Dropout(dropout), model.fc)
    return model


class CNNGRU(nn.Module):
    """Convolutional feature extractor, bidirectional GRU, then mean- and max-pooling over time.

    Args:
        in_channels: number of leads.
        num_outputs: logits.
        widths: channels of the convolution stages; each stage halves the length (stride 2)
            and the first also max-pools, so the GRU sees ``length / 2**(len(widths)+1)`` steps.
        kernel: convolution kernel size.
        hidden: GRU hidden size per direction.
        gru_layers: stacked GRU layers.
        dropout: before the classifier.
    """

    def __init__(self, in_channels: int, num_outputs: int, widths: list[int], kernel: int,
                 hidden: int, gru_layers: int, dropout: float) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        c_in = in_channels
        for i, c_out in enumerate(widths):
            stages += [
                nn.Conv1d(c_in, c_out, kernel, stride=2, padding=kernel // 2, bias=False),
                nn.BatchNorm1d(c_out),
                nn.ReLU(inplace=True),
            ]
            if i == 0:
                stages.append(nn.MaxPool1d(2))
            c_in = c_out
        self.features = nn.Sequential(*stages)
        self.gru = nn.GRU(c_in, hidden, num_layers=gru_layers, batch_first=True,
                          bidirectional=True)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * hidden, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).transpose(1, 2)  # (B, T, C)
        out, _ = self.gru(h)
        pooled = torch.cat([out.mean(dim=1), out.amax(dim=1)], dim=1)
        return self.head(pooled)


@network(modality="ecg", example_spec=_EX1D, example_input=_example, gradcam_layer="features")
def cnn_gru(*, spatial_dims: int = 1, in_channels: int, num_outputs: int,
            size: int | None = None, length: int | None = None,
            widths: list[int] | None = None, kernel: int = 7, hidden: int = 64,
            gru_layers: int = 1, dropout: float = 0.2, **extra: Any) -> nn.Module:
    """CNN + bidirectional GRU (see :class:`CNNGRU`); default widths 32-64-64-128."""
    _check_1d("cnn_gru", spatial_dims, extra)
    widths = list(widths or [32, 64, 64, 128])
    if not widths:
        raise ConfigError("cnn_gru needs at least one convolution stage")
    if length is not None and length < 2 ** (len(widths) + 1):
        raise ConfigError(f"cnn_gru needs windows of at least {2 ** (len(widths) + 1)} samples")
    return CNNGRU(in_channels, num_outputs, widths, kernel, hidden, gru_layers, dropout)
