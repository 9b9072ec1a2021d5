"""Slide-level networks over bags of tile embeddings.

* ``abmil``: attention-based multiple-instance learning with the gated attention of Ilse,
  Tomczak and Welling (ICML 2018, eq. 9): each tile embedding ``h_k`` is projected
  (``Linear → ReLU → Dropout``), scored ``a_k ∝ exp(wᵀ(tanh(V h_k) ⊙ sigm(U h_k)))`` over the
  slide's tiles, and the attention-weighted mean is classified. The attention weights are the
  heat map (:meth:`ABMIL.attend`); the classifier applied to each tile on its own gives tile
  scores (:meth:`ABMIL.tile_logits`).

No field library offers ABMIL for plain torch (MONAI's ``MILModel`` embeds a torchvision ResNet,
which does not import beside the CPU torch wheel, and reads pixels, not cached embeddings), so
the forty lines are written here.

The input is a :class:`Bags` batch (padded embeddings and a mask), or a plain tensor
``(B, N, D)`` of equal-sized bags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from meddx.errors import ConfigError, InputMismatchError
from meddx.modalities.networks import network

__all__ = ["ABMIL", "Bags", "abmil", "pad_bags"]


@dataclass
class Bags:
    """A batch of bags: ``features (B, N, D)`` zero-padded and ``mask (B, N)`` (True = a tile).

    Has ``to()`` so Lightning moves it to the device like a tensor.
    """

    features: torch.Tensor
    mask: torch.Tensor

    def to(self, *args: Any, **kwargs: Any) -> Bags:
        features = self.features.to(*args, **kwargs)
        return Bags(features, self.mask.to(features.device))

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def sizes(self) -> torch.Tensor:
        """Tiles per bag."""
        return self.mask.sum(1)


def pad_bags(bags: list[torch.Tensor]) -> Bags:
    """Stack bags ``(N_i, D)`` of different sizes into one zero-padded :class:`Bags`."""
    if not bags:
        raise InputMismatchError("no bag to batch")
    dims = {int(b.shape[-1]) for b in bags}
    if len(dims) != 1 or any(b.ndim != 2 for b in bags):
        raise InputMismatchError(f"bags must be (tiles, D) with one D; got "
                                 f"{[tuple(b.shape) for b in bags]}")
    if any(len(b) == 0 for b in bags):
        raise InputMismatchError("a slide without tiles cannot be classified",
                                 hint="lower min_tissue, or check the slide has tissue")
    n = max(len(b) for b in bags)
    d = dims.pop()
    x = bags[0].new_zeros((len(bags), n, d), dtype=torch.float32)
    mask = torch.zeros((len(bags), n), dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, : len(b)] = b.float()
        mask[i, : len(b)] = True
    return Bags(x, mask)


def _as_bags(x: Bags | torch.Tensor) -> Bags:
    if isinstance(x, Bags):
        return x
    if isinstance(x, torch.Tensor) and x.ndim == 3:
        return Bags(x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))
    if isinstance(x, torch.Tensor) and x.ndim == 2:
        return _as_bags(x[None])
    raise InputMismatchError(
        f"ABMIL takes bags of tile embeddings (Bags, or a (B, N, D) tensor), got "
        f"{type(x).__name__}{tuple(x.shape) if isinstance(x, torch.Tensor) else ''}")


class ABMIL(nn.Module):
    """Gated-attention MIL (Ilse et al. 2018).

    Args:
        in_features: embedding width ``D``.
        num_outputs: logits (the task decides activation and loss).
        hidden: width ``L`` of the tile projection.
        attention: width of the attention network (``V``, ``U``).
        dropout: after the projection (and on the attention branch).
        gated: gated attention (the paper's best); False: plain tanh attention.
    """

    def __init__(self, in_features: int, num_outputs: int, hidden: int = 128,
                 attention: int = 64, dropout: float = 0.25, gated: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.project = nn.Sequential(nn.LayerNorm(in_features), nn.Linear(in_features, hidden),
                                     nn.ReLU(), nn.Dropout(dropout))
        self.attn_v = nn.Linear(hidden, attention)
        self.attn_u = nn.Linear(hidden, attention) if gated else None
        self.attn_w = nn.Linear(attention, 1)
        self.classifier = nn.Linear(hidden, num_outputs)

    def _scores(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(self.attn_v(h))
        if self.attn_u is not None:
            a = a * torch.sigmoid(self.attn_u(h))
        s = self.attn_w(a).squeeze(-1).float()
        return s.masked_fill(~mask, float("-inf"))

    def attend(self, x: Bags | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B, outputs), attention (B, N))``; attention sums to 1 over each bag's
        tiles and is 0 on padding."""
        bags = _as_bags(x)
        if bags.features.shape[-1] != self.in_features:
            raise InputMismatchError(
                f"tile embeddings have {bags.features.shape[-1]} features; the model takes "
                f"{self.in_features}", hint="embed the slide with the model's encoder")
        h = self.project(bags.features)
        att = torch.softmax(self._scores(h, bags.mask), dim=1)
        pooled = torch.einsum("bn,bnl->bl", att.to(h.dtype), h)
        return self.classifier(pooled), att

    def forward(self, x: Bags | torch.Tensor) -> torch.Tensor:
        return self.attend(x)[0]

    def tile_logits(self, x: Bags | torch.Tensor) -> torch.Tensor:
        """The classifier on each tile alone ``(B, N, outputs)`` (the tile scores of the heat
        map; a bag of one tile gives its slide logit)."""
        bags = _as_bags(x)
        return self.classifier(self.project(bags.features))


def _example(spec: dict[str, Any], batch: int) -> Bags:
    g = torch.Generator().manual_seed(0)
    sizes = [3 + (7 * i) % 11 for i in range(batch)]  # bags of different sizes
    return pad_bags([torch.randn(n, spec["in_channels"], generator=g) for n in sizes])


_SPEC = {"spatial_dims": 0, "in_channels": 32, "size": None}


@network(modality="pathology", example_spec=_SPEC, example_input=_example)
def abmil(*, num_outputs: int, spatial_dims: int = 0, in_channels: int = 512,
          size: Any = None, hidden: int = 128, attention: int = 64, dropout: float = 0.25,
          gated: bool = True) -> ABMIL:
    """Gated-attention MIL over tile embeddings of width ``in_channels``."""
    if spatial_dims != 0:
        raise ConfigError("abmil reads bags of tile embeddings (spatial_dims 0)",
                          hint="train it with the pathology modality")
    return ABMIL(int(in_channels), num_outputs, hidden=hidden, attention=attention,
                 dropout=dropout, gated=gated)
