"""The decoded image every reader returns (its own module, so that the readers and the grid
mapping share it without importing each other)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ImageData"]


@dataclass
class ImageData:
    """One decoded image.

    Attributes:
        array: float32, channel-first: ``(C, H, W)`` (2D) or ``(C, D, H, W)`` (3D).
        spatial_dims: 2 or 3.
        meta: ``format``, ``modality`` (DICOM Modality or None), ``photometric``,
            ``original_shape``, ``spacing`` (mm per spatial axis or None), ``value_range``
            (``[lo, hi]`` of the source's integer range after rescale, or None when unknown),
            ``n_frames``, ``notes`` (what was converted) and format-specific keys. No PHI.
    """

    array: np.ndarray
    spatial_dims: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.array.shape[0])

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape[1:])
