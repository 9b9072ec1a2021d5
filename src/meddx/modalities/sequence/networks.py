"""DNA sequence networks on one-hot input (N, 4, L).

* ``seq_cnn`` — a DeepSEA/Basset-style 1D CNN: convolution blocks (conv → batch norm → ReLU →
  max-pool → dropout), then the flattened map through a fully connected layer, so the network
  keeps *where* a motif sits (splice junctions sit at a fixed offset). Built for one length.
* ``seq_cnn_gru`` — convolution blocks followed by a bidirectional GRU over positions (DanQ's
  layout); the final hidden states of both directions feed the classifier.

Neither exists in MONAI (its 1D nets are image nets), hence our own few lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from meddx.errors import ConfigError
from meddx.modalities.networks import network

__all__ = ["seq_cnn", "seq_cnn_gru", "SeqCNN", "SeqCNNGRU"]

_EX = {"spatial_dims": 1, "in_channels": 4, "size": 60, "length": 60}


def _example(spec: dict[str, Any], batch: int) -> torch.Tensor:
    length = spec.get("length") or spec["size"]
    idx = torch.randint(0, 4, (batch, length))
    return nn.functional.one_hot(idx, 4).permute(0, 2, 1).float()


def _blocks(in_channels: int, filters: Sequence[int], kernels: Sequence[int],
            pools: Sequence[int], dropout: float) -> tuple[nn.Sequential, int]:
    if not (len(filters) == len(kernels) == len(pools)) or not filters:
        raise ConfigError("filters, kernels and pools must be non-empty lists of equal length")
    layers: list[nn.Module] = []
    c = in_channels
    for f, k, p in zip(filters, kernels, pools, strict=True):
        block: list[nn.Module] = [nn.Conv1d(c, f, k, padding=k // 2), nn.BatchNorm1d(f),
                                  nn.ReLU(inplace=True)]
        if p > 1:
            block.append(nn.MaxPool1d(p))
        if dropout:
            block.append(nn.Dropout(dropout))
        layers.append(nn.Sequential(*block))
        c = f
    return nn.Sequential(*layers), c


def _out_length(length: int, kernels: Sequence[int], pools: Sequence[int]) -> int:
    n = length
    for k, p in zip(kernels, pools, strict=True):
        n = n + 2 * (k // 2) - k + 1  # 'same' for odd kernels
        n = n // p if p > 1 else n
    return n


def _check(in_channels: int, length: int | None) -> int:
    if in_channels != 4:
        raise ConfigError(f"DNA models take 4 channels (A, C, G, T), got {in_channels}")
    if not length or length < 1:
        raise ConfigError("DNA models need the sequence length (input_spec 'length')")
    return int(length)


class SeqCNN(nn.Module):
    """Convolution blocks → flatten (or global max-pool) → FC → logits."""

    def __init__(self, length: int, num_outputs: int, filters: Sequence[int],
                 kernels: Sequence[int], pools: Sequence[int], hidden: int, dropout: float,
                 global_pool: bool = False) -> None:
        super().__init__()
        self.features, c = _blocks(4, filters, kernels, pools, dropout / 2)
        n = _out_length(length, kernels, pools)
        if n < 1:
            raise ConfigError(f"sequence length {length} is too short for {len(pools)} "
                              f"pooling steps {list(pools)}", hint="use fewer or smaller pools")
        # global max-pooling keeps *whether* a motif occurs, not where: for motifs at variable
        # offsets (promoter boxes) and small data sets
        head: list[nn.Module] = [nn.AdaptiveMaxPool1d(1)] if global_pool else []
        self.classifier = nn.Sequential(*head, nn.Flatten(), nn.Linear(c * (1 if global_pool
                                                                             else n), hidden),
                                        nn.ReLU(inplace=True), nn.Dropout(dropout),
                                        nn.Linear(hidden, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SeqCNNGRU(nn.Module):
    """Convolution blocks → bidirectional GRU → final states of both directions → logits."""

    def __init__(self, num_outputs: int, filters: Sequence[int], kernels: Sequence[int],
                 pools: Sequence[int], gru_hidden: int, dropout: float) -> None:
        super().__init__()
        self.features, c = _blocks(4, filters, kernels, pools, dropout / 2)
        self.gru = nn.GRU(c, gru_hidden, batch_first=True, bidirectional=True)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * gru_hidden, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).transpose(1, 2)  # (N, L', C)
        _, h_n = self.gru(h)  # (2, N, H)
        return self.head(torch.cat([h_n[0], h_n[1]], dim=1))


@network(modality="sequence", example_spec=_EX, example_input=_example,
         gradcam_layer="features.2")
def seq_cnn(*, num_outputs: int, spatial_dims: int = 1, in_channels: int = 4,
            size: int | None = None, length: int | None = None,
            filters: Sequence[int] = (64, 128, 128), kernels: Sequence[int] = (9, 5, 3),
            pools: Sequence[int] = (2, 2, 1), hidden: int = 128, dropout: float = 0.3,
            global_pool: bool = False) -> nn.Module:
    """DeepSEA/Basset-style 1D CNN for fixed-length one-hot DNA (4 × ``length``).

    Args:
        filters / kernels / pools: per convolution block (pool 1 = none).
        hidden: width of the fully connected layer.
        dropout: before the last layer (half of it after each block).
        global_pool: max over all positions before the FC layer (position-invariant motifs)
            instead of flattening the map (position-specific, the default).
    """
    if spatial_dims != 1:
        raise ConfigError(f"seq_cnn is 1D; got spatial_dims={spatial_dims}")
    n = _check(in_channels, length or size)
    return SeqCNN(n, num_outputs, filters, kernels, pools, hidden, dropout, global_pool)


@network(modality="sequence", example_spec=_EX, example_input=_example,
         gradcam_layer="features.1")
def seq_cnn_gru(*, num_outputs: int, spatial_dims: int = 1, in_channels: int = 4,
                size: int | None = None, length: int | None = None,
                filters: Sequence[int] = (64, 128), kernels: Sequence[int] = (9, 5),
                pools: Sequence[int] = (2, 1), gru_hidden: int = 64, dropout: float = 0.3
                ) -> nn.Module:
    """CNN + bidirectional GRU (DanQ-style) for one-hot DNA (4 × L)."""
    if spatial_dims != 1:
        raise ConfigError(f"seq_cnn_gru is 1D; got spatial_dims={spatial_dims}")
    _check(in_channels, length or size)
    return SeqCNNGRU(num_outputs, filters, kernels, pools, gru_hidden, dropout)
