"""Two random views per image for contrastive (SimCLR) pretraining, made on whole batches.

SimCLR's views (Chen et al. 2020) are a random resized crop, a flip, colour jitter, random
grey and Gaussian blur. Here the geometric part — crop (zoom and translation), aspect
change, flips and rotation — is one affine matrix per sample, applied to the whole batch with
one ``grid_sample`` (as :class:`~meddx.modalities.image.augment.BatchAugment` does: per-sample
Python transforms cost more than the training step on a 2-core CPU); the photometric part is
per-sample tensor arithmetic. 2D and 3D images alike (in 3D: isotropic crops, rotation about
each axis, no saturation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from meddx.modalities.image.augment import _rotation_3d

__all__ = ["ContrastiveViews"]


class ContrastiveViews:
    """``views(x) -> (v1, v2)``: two independently augmented copies of a batch ``x``.

    Args:
        spatial_dims: 2 or 3.
        channels: image channels; saturation jitter and random grey apply to 3-channel images.
        crop_scale: range of the crop's area (volume) as a fraction of the image.
        aspect: 2D crops' aspect-ratio range (log-uniform).
        flips: flip each spatial axis with probability 0.5.
        rotate_degrees: maximum rotation.
        brightness: maximum relative brightness change (0.4 → ×0.6..1.4).
        contrast: maximum relative contrast change about the image mean.
        saturation: maximum relative saturation change (RGB only).
        jitter_prob: probability that a view gets the colour jitter.
        grey_prob: probability that an RGB view is turned grey.
        blur_prob: probability of a Gaussian blur (sigma 0.1–2 px at 32 px, scaled with size).
        noise: standard deviation of additive Gaussian noise (0 = none).
    """

    def __init__(self, spatial_dims: int, channels: int, *,
                 crop_scale: tuple[float, float] = (0.3, 1.0),
                 aspect: tuple[float, float] = (3 / 4, 4 / 3), flips: bool = True,
                 rotate_degrees: float = 20.0, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.4, jitter_prob: float = 0.8, grey_prob: float = 0.2,
                 blur_prob: float = 0.0, noise: float = 0.0) -> None:
        self.dims = spatial_dims
        self.channels = channels
        self.crop_scale = crop_scale
        self.aspect = aspect
        self.flips = flips
        self.rotate = math.radians(rotate_degrees)
        self.brightness = brightness
        self.contrast = contrast
        self.saturation = saturation if channels == 3 else 0.0
        self.jitter_prob = jitter_prob
        self.grey_prob = grey_prob if channels == 3 else 0.0
        self.blur_prob = blur_prob
        self.noise = noise

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float()
        return self.view(x), self.view(x)

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """One random view of every image in the batch."""
        x = self._geometry(x)
        x = self._jitter(x)
        if self.grey_prob > 0:
            grey = _grey(x).expand_as(x)
            x = torch.where(_per_sample(torch.rand(len(x)) < self.grey_prob, x), grey, x)
        if self.blur_prob > 0:
            x = self._blur(x)
        if self.noise > 0:
            x = x + torch.randn_like(x) * self.noise
        return x.contiguous()

    def _geometry(self, x: torch.Tensor) -> torch.Tensor:
        n, d = x.shape[0], self.dims
        lo, hi = self.crop_scale
        area = lo + torch.rand(n) * (hi - lo)
        side = area.pow(1.0 / d).unsqueeze(1).repeat(1, d)  # crop side / image side, per axis
        if d == 2:
            log_lo, log_hi = math.log(self.aspect[0]), math.log(self.aspect[1])
            ratio = torch.exp(log_lo + torch.rand(n) * (log_hi - log_lo)).sqrt()
            side = torch.stack([side[:, 0] * ratio, side[:, 1] / ratio], 1).clamp(max=1.0)
        # the crop's centre: anywhere that keeps the (unrotated) crop inside the image
        shift = (torch.rand(n, d) * 2 - 1) * (1 - side)
        scale = torch.diag_embed(side)
        if self.flips:
            signs = torch.where(torch.rand(n, d) < 0.5, -1.0, 1.0)
            scale = scale * signs.unsqueeze(1)
        theta = torch.zeros(n, d, d + 1)
        theta[:, :, :d] = self._rotation(n) @ scale
        theta[:, :, d] = shift
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                             align_corners=False)

    def _rotation(self, n: int) -> torch.Tensor:
        if self.rotate <= 0:
            return torch.eye(self.dims).expand(n, -1, -1)
        if self.dims == 3:
            return _rotation_3d(n, self.rotate, torch.device("cpu"))
        a = (torch.rand(n) * 2 - 1) * self.rotate
        c, s = torch.cos(a), torch.sin(a)
        return torch.stack([c, -s, s, c], 1).view(n, 2, 2)

    def _jitter(self, x: torch.Tensor) -> torch.Tensor:
        if self.jitter_prob <= 0:
            return x
        n = len(x)
        apply = _per_sample(torch.rand(n) < self.jitter_prob, x)
        out = x
        if self.brightness > 0:
            b = 1 + (torch.rand(n) * 2 - 1) * self.brightness
            out = out * _per_sample(b, x)
        if self.contrast > 0:
            c = _per_sample(1 + (torch.rand(n) * 2 - 1) * self.contrast, x)
            mean = _grey(out).mean(dim=tuple(range(2, x.ndim)), keepdim=True)
            out = (out - mean) * c + mean
        if self.saturation > 0:
            s = _per_sample(1 + (torch.rand(n) * 2 - 1) * self.saturation, x)
            grey = _grey(out)
            out = (out - grey) * s + grey
        return torch.where(apply, out, x)

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        # one sigma per batch (one convolution), applied to a random half of the samples
        size = x.shape[-1]
        sigma = (0.1 + torch.rand(()).item() * 1.9) * size / 32
        radius = max(1, min(int(math.ceil(2 * sigma)), size // 2 - 1))
        t = torch.arange(-radius, radius + 1, dtype=x.dtype)
        k = torch.exp(-(t**2) / (2 * sigma**2))
        k = k / k.sum()
        conv = F.conv2d if self.dims == 2 else F.conv3d
        c = x.shape[1]
        blurred = x
        for axis in range(self.dims):
            shape = [1, 1] + [1] * self.dims
            shape[2 + axis] = len(k)
            weight = k.view(shape).expand(c, *shape[1:])
            pad = [0] * (2 * self.dims)
            pad[2 * (self.dims - 1 - axis)] = pad[2 * (self.dims - 1 - axis) + 1] = radius
            blurred = conv(F.pad(blurred, pad, mode="reflect"), weight, groups=c)
        apply = _per_sample(torch.rand(len(x)) < self.blur_prob, x)
        return torch.where(apply, blurred, x)


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (x.ndim - 1)))


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, *([1] * (x.ndim - 2)))
        return (x * w).sum(1, keepdim=True)
    return x.mean(1, keepdim=True)
