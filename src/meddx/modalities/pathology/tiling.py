"""Tissue detection and tiling of whole-slide images, streaming.

:func:`tissue_mask` thresholds the saturation of a low-resolution thumbnail with Otsu's method
(the CLAM / HistoQC recipe: glass is grey-white, stained tissue is coloured), then closes small
gaps and drops specks. :func:`tile_index` lays a grid of tiles of ``size`` pixels at ``mpp``
µm/px (with ``overlap``) over the slide and keeps those whose tissue fraction, measured on the
mask, is at least ``min_tissue``. Coordinates are level-0 pixels, so heat maps drawn from them
line up with the slide at any level. :func:`iter_tiles` reads the kept tiles in batches: memory
holds one batch, never a level.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meddx.errors import ConfigError, DataError, InputMismatchError
from meddx.modalities.pathology.slide import Slide

__all__ = ["TileIndex", "tissue_mask", "tile_index", "iter_tiles", "mask_from_rgb", "saturation",
           "MIN_SATURATION", "MAX_SATURATION", "MASK_MPP", "MAX_UPSAMPLE"]

logger = logging.getLogger(__name__)

# Otsu's threshold is kept within these saturations: on a field that is all glass (or all tissue)
# it splits noise (or tissue) in two, while on H&E scans glass stays below ~0.03 and stained tissue
# above ~0.2 (Otsu gives 0.199 on the bundled CMU-1-Small-Region, glass median 0.012).
MIN_SATURATION = 0.05
MAX_SATURATION = 0.2
# finest resolution of a tissue mask (µm/px): coarse enough to see tissue, not fibres
MASK_MPP = 4.0
# tiles finer than the scan by more than this factor are refused unless asked for: their pixels
# would be invented by interpolation, not seen (a 72-dpi tag read as 353 µm/px once gave tiles
# of one level-0 pixel blown up 224 times)
MAX_UPSAMPLE = 2.0
_FORMAT = "meddx-tile-index"


@dataclass
class TileIndex:
    """The tiles kept on one slide.

    Attributes:
        mpp: µm per pixel of the tiles.
        size: tile side in pixels at ``mpp``.
        overlap: pixels (at ``mpp``) shared by neighbouring tiles.
        level0_size: tile side at level 0 (``size * mpp / slide.mpp``, rounded).
        coords: ``(N, 2)`` int64 level-0 top-left ``x, y`` of each tile.
        tissue: ``(N,)`` float32 tissue fraction of each tile.
        slide_dimensions: the slide's level-0 ``(width, height)``.
    """

    mpp: float
    size: int
    overlap: int
    level0_size: int
    coords: np.ndarray
    tissue: np.ndarray
    slide_dimensions: tuple[int, int]

    def __len__(self) -> int:
        return int(len(self.coords))

    def header(self) -> dict:
        """The JSON header written by :meth:`save`."""
        return {"format": _FORMAT, "version": 1, "mpp": self.mpp, "size": self.size,
                "overlap": self.overlap, "level0_size": self.level0_size,
                "slide_dimensions": list(self.slide_dimensions), "count": len(self)}

    def save(self, path: str | Path) -> None:
        """Write a CSV of ``x,y,tissue`` rows below a one-line ``# {json}`` header."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8", newline="\n") as f:
            f.write("# " + json.dumps(self.header()) + "\n")
            f.write("x,y,tissue\n")
            for (x, y), t in zip(self.coords.tolist(), self.tissue.tolist(), strict=True):
                f.write(f"{x},{y},{t:.4f}\n")

    @classmethod
    def load(cls, path: str | Path) -> TileIndex:
        """Read a tile index written by :meth:`save`.

        Raises:
            DataError: the file is missing or is not a meddx tile index.
        """
        path = Path(path)
        try:
            with path.open(encoding="utf-8") as f:
                first = f.readline()
                columns = f.readline().strip()
                head = json.loads(first[1:]) if first.startswith("#") else {}
                if head.get("format") != _FORMAT or columns != "x,y,tissue":
                    raise DataError("not a meddx tile index", path=str(path))
                rows = np.loadtxt(f, delimiter=",", ndmin=2, dtype=np.float64)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read the tile index: {e}", path=str(path)) from e
        rows = rows.reshape(-1, 3)
        if len(rows) != head["count"]:
            raise DataError(f"tile index holds {len(rows)} rows, its header says "
                            f"{head['count']}", path=str(path))
        return cls(mpp=float(head["mpp"]), size=int(head["size"]),
                   overlap=int(head["overlap"]), level0_size=int(head["level0_size"]),
                   coords=rows[:, :2].astype(np.int64), tissue=rows[:, 2].astype(np.float32),
                   slide_dimensions=tuple(int(v) for v in head["slide_dimensions"]))


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` of uint8 RGB, as float32 in [0, 1]."""
    rgb = rgb.astype(np.float32)
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    return np.where(hi > 0, (hi - lo) / np.maximum(hi, 1.0), 0.0).astype(np.float32)


def mask_from_rgb(thumb: np.ndarray) -> np.ndarray:
    """Tissue mask of a uint8 RGB thumbnail (what :func:`tissue_mask` computes on the slide's).

    A 5x5 median filter on HSV saturation, Otsu's threshold on it (kept within
    :data:`MIN_SATURATION` and :data:`MAX_SATURATION`), a 3x3 closing, then specks and holes smaller than 0.01 % of the
    thumbnail are removed.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_holes, remove_small_objects

    sat = ndimage.median_filter(saturation(thumb), size=5, mode="nearest")
    threshold = MIN_SATURATION
    if float(sat.max()) > float(sat.min()):
        threshold = min(max(float(threshold_otsu(sat)), MIN_SATURATION), MAX_SATURATION)
    mask = ndimage.binary_closing(sat > threshold, structure=np.ones((3, 3), bool),
                                  border_value=0)
    area = max(16, int(mask.size * 1e-4))
    mask = remove_small_objects(mask, max_size=area - 1)
    mask = remove_small_holes(mask, max_size=area - 1)
    logger.debug("tissue threshold %.3f, %.1f %% tissue", threshold, 100 * mask.mean())
    return mask


def tissue_mask(slide: Slide, max_side: int = 2048, *, mask_mpp: float = MASK_MPP
                ) -> tuple[np.ndarray, float]:
    """Where the tissue is, on a thumbnail of the slide (see :func:`mask_from_rgb`).

    The thumbnail is ``mask_mpp`` µm/px, or coarser when that would make its longest side more
    than ``max_side``: at that scale the pale gaps between collagen fibres are tissue, not glass.

    Args:
        slide: an open slide.
        max_side: longest side of the mask in pixels, at most.
        mask_mpp: finest resolution of the mask, µm per pixel.

    Returns:
        ``(mask, downsample)``: a bool ``(h, w)`` mask and its downsample against level 0
        (level-0 pixels per mask pixel).
    """
    if not mask_mpp > 0:
        raise ConfigError(f"mask_mpp must be positive, got {mask_mpp}")
    side = max(slide.dimensions) * slide.mpp / mask_mpp
    mask = mask_from_rgb(slide.thumbnail(max(16, min(max_side, int(math.ceil(side))))))
    return mask, float(slide.dimensions[0] / mask.shape[1])


def _check(mpp: float, size: int, overlap: int, min_tissue: float) -> None:
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ConfigError(f"tile mpp must be a positive number, got {mpp}")
    if size < 1:
        raise ConfigError(f"tile size must be at least 1 pixel, got {size}")
    if not 0 <= overlap < size:
        raise ConfigError(f"overlap must be in [0, size), got {overlap} for size {size}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ConfigError(f"min_tissue is a fraction in [0, 1], got {min_tissue}")


def _box_fractions(mask: np.ndarray, slide_dims: tuple[int, int], x: np.ndarray, y: np.ndarray,
                   side: int) -> np.ndarray:
    """Mean of ``mask`` over each level-0 box ``[x, x + side) x [y, y + side)`` (summed-area
    table, so every tile costs four look-ups)."""
    mh, mw = mask.shape
    sx, sy = mw / slide_dims[0], mh / slide_dims[1]
    table = np.zeros((mh + 1, mw + 1), np.int64)
    table[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    c0 = np.clip(np.floor(x * sx), 0, mw - 1).astype(np.int64)
    r0 = np.clip(np.floor(y * sy), 0, mh - 1).astype(np.int64)
    c1 = np.clip(np.ceil((x + side) * sx), c0 + 1, mw).astype(np.int64)
    r1 = np.clip(np.ceil((y + side) * sy), r0 + 1, mh).astype(np.int64)
    total = table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]
    return (total / ((r1 - r0) * (c1 - c0))).astype(np.float32)


def _check_upsampling(slide: Slide, mpp: float, allow: bool) -> None:
    factor = slide.mpp / mpp
    if factor <= MAX_UPSAMPLE * 1.01 or allow:
        if factor > 1.01:
            logger.warning("%s: tiles at %.3g µm/px are %.3g times finer than the scan "
                           "(%.4g µm/px): upsampled", slide.path.name, mpp, factor, slide.mpp)
        return
    raise InputMismatchError(
        f"tiles at {mpp:g} µm/px would be {factor:.3g} times finer than the slide's scan "
        f"({slide.mpp:.4g} µm/px): every tile pixel would be interpolated, not seen",
        hint=f"cut tiles at {slide.mpp:.4g} µm/px or coarser; if the file's resolution is wrong, "
        "give the true one with --slide-mpp; to upsample on purpose pass --allow-upsample "
        "(allow_upsample=True)", path=slide.path.name)


def tile_index(slide: Slide, mpp: float = 0.5, size: int = 224, overlap: int = 0,
               min_tissue: float = 0.5, *, mask: tuple[np.ndarray, float] | None = None,
               allow_upsample: bool = False) -> TileIndex:
    """The grid of tiles on tissue.

    Tiles lie wholly inside the slide, start at its top-left corner and step by
    ``size - overlap`` pixels at ``mpp``; a tile is kept when at least ``min_tissue`` of it is
    tissue on :func:`tissue_mask` (``min_tissue=0`` keeps every tile).

    Args:
        slide: an open slide.
        mpp: µm per pixel of the tiles.
        size: tile side in pixels at ``mpp``.
        overlap: pixels (at ``mpp``) shared by neighbouring tiles.
        min_tissue: least tissue fraction of a kept tile.
        mask: a ``tissue_mask(slide)`` result to reuse (computed when None).
        allow_upsample: cut tiles finer than the scan by more than :data:`MAX_UPSAMPLE` times.

    Raises:
        ConfigError: a parameter is out of range.
        InputMismatchError: ``mpp`` is more than :data:`MAX_UPSAMPLE` times finer than the
            slide's scan and ``allow_upsample`` is False.
    """
    _check(mpp, size, overlap, min_tissue)
    _check_upsampling(slide, mpp, allow_upsample)
    factor = mpp / slide.mpp
    side = max(1, int(round(size * factor)))
    stride = max(1, int(round((size - overlap) * factor)))
    W, H = slide.dimensions
    xs = np.arange(0, W - side + 1, stride, dtype=np.int64)
    ys = np.arange(0, H - side + 1, stride, dtype=np.int64)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")  # row-major: neighbours are read together
    x, y = gx.ravel(), gy.ravel()
    if mask is None:
        mask = tissue_mask(slide)
    fractions = _box_fractions(mask[0], slide.dimensions, x, y, side) if len(x) else \
        np.zeros(0, np.float32)
    keep = fractions >= min_tissue
    if not len(x):
        logger.warning("%s: the slide (%dx%d) is smaller than one tile (%d px at level 0)",
                       slide.path.name, W, H, side)
    return TileIndex(mpp=float(mpp), size=int(size), overlap=int(overlap), level0_size=side,
                     coords=np.stack([x[keep], y[keep]], axis=1).astype(np.int64).reshape(-1, 2),
                     tissue=fractions[keep].astype(np.float32),
                     slide_dimensions=(int(W), int(H)))


def iter_tiles(slide: Slide, index: TileIndex, batch_size: int = 32
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Read the tiles of ``index`` in batches, streaming.

    Yields:
        ``(coords, tiles)``: ``(B, 2)`` int64 level-0 ``x, y`` and ``(B, size, size, 3)`` uint8
        RGB at ``index.mpp``; the last batch may be shorter. Only one batch is held at a time.

    Raises:
        ConfigError: ``batch_size`` < 1, or the index was made on a slide of other dimensions.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if tuple(index.slide_dimensions) != tuple(slide.dimensions):
        raise ConfigError(f"the tile index is for a {index.slide_dimensions} slide, this one is "
                          f"{slide.dimensions}", path=slide.path.name)
    n = len(index)
    for start in range(0, n, batch_size):
        coords = index.coords[start:start + batch_size]
        tiles = np.empty((len(coords), index.size, index.size, 3), np.uint8)
        for i, (x, y) in enumerate(coords.tolist()):
            tiles[i] = slide.read_at_mpp((x, y), index.mpp, index.size)
        yield coords, tiles
