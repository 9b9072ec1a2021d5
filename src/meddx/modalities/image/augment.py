"""Batch-level image augmentation: one affine grid per sample, applied with one ``grid_sample``.

Per-sample MONAI transforms run in Python for every image; on a 2-core CPU they cost more than
the training step. Applying the same family of transforms to the whole batch as tensors keeps
augmentation under a few percent of step time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["BatchAugment"]


class BatchAugment:
    """Random flips, rotation (+ mild scaling), intensity scaling and Gaussian noise.

    Args:
        spatial_dims: 2 or 3.
        flips: flip each spatial axis with probability 0.5 (turn off where laterality matters).
        rotate_degrees: maximum rotation (2D: in-plane; 3D: about each axis).
        intensity: maximum relative intensity scaling (0.1 → ×0.9..1.1).
        noise: standard deviation of additive Gaussian noise (0 = none).
        prob: probability that a sample gets the affine part.
    """

    def __init__(self, spatial_dims: int, flips: bool = True, rotate_degrees: float = 10.0,
                 intensity: float = 0.1, noise: float = 0.0, prob: float = 0.5) -> None:
        self.dims = spatial_dims
        self.flips = flips
        self.rotate = math.radians(rotate_degrees)
        self.intensity = intensity
        self.noise = noise
        self.prob = prob

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.dims + 2:
            return x
        if self.flips:
            for axis in range(2, 2 + self.dims):
                mask = torch.rand(x.shape[0], device=x.device) < 0.5
                if mask.any():
                    x = torch.where(_bcast(mask, x), x.flip(axis), x)
        if self.rotate > 0:
            x = self._affine(x)
        if self.intensity > 0:
            scale = 1 + (torch.rand(x.shape[0], device=x.device) * 2 - 1) * self.intensity
            x = x * scale.view(-1, *([1] * (x.ndim - 1)))
        if self.noise > 0:
            x = x + torch.randn_like(x) * self.noise
        return x

    def _affine(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        apply = torch.rand(n, device=x.device) < self.prob
        if not apply.any():
            return x
        scale = 1 + (torch.rand(n, device=x.device) * 2 - 1) * 0.1
        if self.dims == 2:
            a = (torch.rand(n, device=x.device) * 2 - 1) * self.rotate
            cos, sin = torch.cos(a) / scale, torch.sin(a) / scale
            theta = torch.zeros(n, 2, 3, device=x.device)
            theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        else:
            theta = torch.zeros(n, 3, 4, device=x.device)
            theta[:, :3, :3] = _rotation_3d(n, self.rotate, x.device) / scale.view(-1, 1, 1)
        eye = torch.eye(self.dims, self.dims + 1, device=x.device).expand_as(theta)
        theta = torch.where(apply.view(-1, 1, 1), theta, eye)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border",
                            align_corners=False)
        return out.to(x.dtype)


def _bcast(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (x.ndim - 1)))


def _rotation_3d(n: int, max_angle: float, device: torch.device) -> torch.Tensor:
    angles = (torch.rand(n, 3, device=device) * 2 - 1) * max_angle
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones(n, device=device), torch.zeros(n, device=device)
    rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1)
    ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1)
    rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1)
    return rx.view(n, 3, 3) @ ry.view(n, 3, 3) @ rz.view(n, 3, 3)
