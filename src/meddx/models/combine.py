"""Deep ensembles and test-time augmentation for any network: one module, one ONNX graph.

Both are package options on the card (``network.options``), read by
:func:`meddx.models.build_network`:

- ``members: K`` (K ≥ 2) — a deep ensemble (Lakshminarayanan et al. 2017): K copies of the
  network trained as separate runs (seeds ``seed … seed+K-1``) and joined by
  :meth:`Ensemble.from_members`; the output is the mean of the members' logits. A builder that
  takes ``members`` itself (GRU-D fuses its members into batched matrix products) keeps doing
  so; every other network gets :class:`Ensemble`.
- ``tta: hflip`` or ``tta: flips`` — test-time augmentation for image networks
  (:class:`FlipTTA`): the mean of the logits over the image and its flips (``hflip``: the
  last axis, 2 views; ``flips``: every combination of spatial flips, 4 views in 2D and 8 in 3D).
  The views run as one batch through the network, so the cost is one forward on a batch
  ``views`` times larger. Training never sees the wrapper: the network is trained plain and
  wrapped when it is packaged, and the post-hoc fits (temperature, operating points,
  conformal sets, OOD detector) are made on the wrapped output.

Both wrappers are plain ``torch.nn.Module`` code with no data-dependent control flow, so
``meddx export --onnx`` writes one graph that holds all members and views, checked against
torch like any export. Their explanations are the mean of the members' maps over every view
(:mod:`meddx.models.explain`).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from meddx.errors import ConfigError

__all__ = ["Ensemble", "FlipTTA", "TTA_MODES", "WRAPPER_OPTIONS", "flip_views",
           "plain_options", "tta_views"]

TTA_MODES = ("none", "hflip", "flips")
WRAPPER_OPTIONS = ("members", "tta")


def plain_options(options: dict[str, Any], keep: tuple[str, ...] = ()) -> dict[str, Any]:
    """``options`` without the platform's wrapper options (``members``, ``tta``) except
    ``keep``: what one plain network of the recipe is built with."""
    return {k: v for k, v in options.items() if k not in WRAPPER_OPTIONS or k in keep}


class Ensemble(nn.Module):
    """``K`` networks of one architecture; the output is the mean of their logits.

    Args:
        members: the networks (same class and state-dict shapes).
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ConfigError("an ensemble needs two or more members")
        self.members = nn.ModuleList(members)

    @classmethod
    def from_members(cls, nets: list[nn.Module]) -> Ensemble:
        """One ensemble from separately trained networks (same architecture), in eval mode."""
        shapes = [{k: tuple(v.shape) for k, v in n.state_dict().items()} for n in nets]
        if any(type(n) is not type(nets[0]) or s != shapes[0] for n, s in zip(nets, shapes,
                                                                              strict=True)):
            raise ConfigError("ensemble members must share one architecture",
                              hint="join packages trained with the same network and options")
        return cls(list(nets)).eval()

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's logits, ``(K, B, outputs)``."""
        return torch.stack([m(x) for m in self.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.member_logits(x).mean(0)


def flip_views(mode: str, spatial_dims: int) -> list[tuple[int, ...]]:
    """The flipped views of ``mode`` as tuples of tensor axes (the identity, ``()``, last)."""
    axes = list(range(2, 2 + spatial_dims))
    if mode == "hflip":
        views: list[tuple[int, ...]] = [(axes[-1],)]
    elif mode == "flips":
        views = [c for r in range(len(axes), 0, -1) for c in itertools.combinations(axes, r)]
    else:
        raise ConfigError(f"unknown test-time augmentation '{mode}'",
                          hint="choose one of: " + ", ".join(TTA_MODES))
    return [*views, ()]


def tta_views(mode: str | None, spatial_dims: int) -> int:
    """How many forward views ``mode`` costs (1 without TTA)."""
    return 1 if mode in (None, "none") else len(flip_views(str(mode), spatial_dims))


class FlipTTA(nn.Module):
    """Mean logits over an image batch and its flips, run as one batch.

    Args:
        net: the network (or an :class:`Ensemble`) taking ``(B, C, *spatial)``.
        spatial_dims: 2 or 3.
        mode: ``hflip`` or ``flips`` (see :func:`flip_views`).
    """

    def __init__(self, net: nn.Module, spatial_dims: int, mode: str) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ConfigError(f"flip test-time augmentation needs 2D or 3D images, not "
                              f"{spatial_dims}D input")
        self.net = net
        self.mode = mode
        self.spatial_dims = spatial_dims
        self.views = flip_views(mode, spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        # the identity last: a hook on the head sees the plain image's features last
        xs = torch.cat([x.flip(v) if v else x for v in self.views])
        out = self.net(xs)
        return out.reshape(len(self.views), batch, *out.shape[1:]).mean(0)


def describe(options: dict[str, Any]) -> str:
    """A short human label: ``"ensemble of 3, TTA flips"``."""
    parts = []
    if int(options.get("members", 1) or 1) > 1:
        parts.append(f"ensemble of {options['members']}")
    if options.get("tta") not in (None, "none"):
        parts.append(f"TTA {options['tta']}")
    return ", ".join(parts) or "single network"
