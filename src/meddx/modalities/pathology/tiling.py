"""Tissue detection and tiling of whole-slide images, streaming.

:func:`tissue_mask` finds tissue on a thumbnail: Otsu's threshold on the HSV saturation (tissue
stained with H&E is coloured, glass and background are grey or white), floored so that an empty
slide does not turn its noise into tissue, with small specks removed. :func:`tile_index` lays a
grid of tiles of ``size`` pixels at ``mpp`` µm/px (with ``overlap``) over level 0 and keeps the
tiles whose tissue fraction on the mask reaches ``min_tissue``. Coordinates are level-0 pixels,
so heat maps line up with the slide at any level. :func:`iter_tiles` reads the kept tiles in
batches: memory holds one batch, never a level.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from meddx.errors import ConfigError, DataError

__all__ = ["TileIndex", "tissue_mask", "tile_index", "iter_tiles", "MIN_SATURATION"]

#: saturation below which nothing is tissue, whatever Otsu says (an empty slide has a
#: threshold too: the one that splits its noise)
MIN_SATURATION = 0.07


@dataclass
class TileIndex:
    """The tiles of one slide.

    Attributes:
        mpp: µm per pixel of the tiles.
        size: tile side in pixels at ``mpp``.
        overlap: pixels (at ``mpp``) shared by neighbouring tiles.
        level0_size: tile side in level-0 pixels.
        coords: ``(N, 2)`` int64 level-0 top-left ``x, y`` of each kept tile.
        tissue: ``(N,)`` float32 tissue fraction of each tile.
        slide_dimensions: the slide's level-0 ``(width, height)``.
        info: how the index was made (mask threshold, tiles considered …).
    """

    mpp: float
    size: int
    overlap: int
    level0_size: int
    coords: np.ndarray
    tissue: np.ndarray
    slide_dimensions: tuple[int, int]
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(len(self.coords))

    def save(self, path: str | Path) -> None:
        """``path`` (CSV: ``x,y,tissue``) and its header beside it (``.json``)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        rows = ["x,y,tissue"] + [f"{int(x)},{int(y)},{float(t):.4f}"
                                 for (x, y), t in zip(self.coords, self.tissue, strict=True)]
        p.write_text("\n".join(rows) + "\n")
        head = {"mpp": self.mpp, "size": self.size, "overlap": self.overlap,
                "level0_size": self.level0_size, "slide_dimensions": list(self.slide_dimensions),
                "n_tiles": len(self), "info": self.info}
        p.with_suffix(".json").write_text(json.dumps(head, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> TileIndex:
        """Read what :meth:`save` wrote.

        Raises:
            DataError: a missing or malformed file.
        """
        p = Path(path)
        try:
            head = json.loads(p.with_suffix(".json").read_text())
            table = np.loadtxt(p, delimiter=",", skiprows=1, ndmin=2, dtype=np.float64)
        except (OSError, ValueError) as e:
            raise DataError(f"not a tile index: {e}", path=str(p)) from e
        if table.size == 0:
            table = np.zeros((0, 3))
        return cls(mpp=float(head["mpp"]), size=int(head["size"]),
                   overlap=int(head["overlap"]), level0_size=int(head["level0_size"]),
                   coords=table[:, :2].astype(np.int64),
                   tissue=table[:, 2].astype(np.float32),
                   slide_dimensions=tuple(head["slide_dimensions"]),  # type: ignore[arg-type]
                   info=head.get("info", {}))


def _saturation(rgb: np.ndarray) -> np.ndarray:
    x = rgb.astype(np.float32)
    hi, lo = x.max(axis=2), x.min(axis=2)
    return np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-6), 0.0)


def tissue_mask(slide: Any, max_side: int = 2048) -> tuple[np.ndarray, float]:
    """Tissue on a thumbnail of the slide.

    Returns:
        ``(mask, downsample)``: a boolean ``(h, w)`` mask and the level-0 pixels per mask pixel.
    """
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_holes, remove_small_objects

    thumb = slide.thumbnail(max_side)
    sat = _saturation(thumb)
    dark = thumb.max(axis=2) < 25  # pen marks / scanner black borders are not tissue
    try:
        otsu = float(threshold_otsu(sat))
    except ValueError:  # one value only: a blank slide
        otsu = 1.0
    threshold = max(otsu, MIN_SATURATION)
    mask = (sat > threshold) & ~dark
    speck = max(4, mask.size // 20_000)
    mask = remove_small_objects(mask, max_size=speck)
    mask = remove_small_holes(mask, max_size=speck)
    return mask, slide.dimensions[0] / mask.shape[1]


def tile_index(slide: Any, mpp: float = 0.5, size: int = 224, overlap: int = 0,
               min_tissue: float = 0.5, mask: tuple[np.ndarray, float] | None = None
               ) -> TileIndex:
    """The tiles of ``slide`` that hold tissue.

    Args:
        slide: an open :class:`~meddx.modalities.pathology.slide.Slide`.
        mpp: µm per pixel of the tiles (≥ the slide's own).
        size: tile side in pixels at ``mpp``.
        overlap: pixels shared by neighbours (< ``size``).
        min_tissue: minimum tissue fraction of a kept tile (0 keeps every tile).
        mask: a precomputed :func:`tissue_mask` (else computed here).

    Raises:
        ConfigError: a tile geometry that makes no sense, or tiles finer than the scan.
    """
    if size < 8:
        raise ConfigError(f"tile size must be at least 8 pixels, got {size}")
    if not 0 <= overlap < size:
        raise ConfigError(f"overlap must be in [0, size), got {overlap} for size {size}")
    if not 0 <= min_tissue <= 1:
        raise ConfigError(f"min_tissue is a fraction in [0, 1], got {min_tissue}")
    if mpp < slide.mpp * (1 - 1e-3):
        raise ConfigError(f"the slide is scanned at {slide.mpp:.3f} µm/px; tiles at {mpp:g} "
                          "µm/px would be upsampled", hint=f"use --mpp {slide.mpp:.3f} or more")
    factor = mpp / slide.mpp
    side0 = max(1, round(size * factor))
    stride0 = max(1, round((size - overlap) * factor))
    w0, h0 = slide.dimensions
    xs = np.arange(0, w0 - side0 + 1, stride0, dtype=np.int64)
    ys = np.arange(0, h0 - side0 + 1, stride0, dtype=np.int64)
    m, ds = mask if mask is not None else tissue_mask(slide)
    # fraction of mask pixels inside each tile, from an integral image of the mask
    integral = np.pad(m.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    mh, mw = m.shape

    def span(a: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.clip(np.floor(a / ds).astype(np.int64), 0, limit - 1)
        hi = np.clip(np.ceil((a + side0) / ds).astype(np.int64), lo + 1, limit)
        return lo, hi

    x0, x1 = span(xs, mw)
    y0, y1 = span(ys, mh)
    gy0, gx0 = np.meshgrid(y0, x0, indexing="ij")
    gy1, gx1 = np.meshgrid(y1, x1, indexing="ij")
    inside = (integral[gy1, gx1] - integral[gy0, gx1] - integral[gy1, gx0]
              + integral[gy0, gx0])
    frac = (inside / ((gy1 - gy0) * (gx1 - gx0))).astype(np.float32)
    keep = frac >= min_tissue if min_tissue > 0 else np.ones_like(frac, dtype=bool)
    iy, ix = np.nonzero(keep)
    coords = np.stack([xs[ix], ys[iy]], axis=1) if len(iy) else np.zeros((0, 2), np.int64)
    return TileIndex(mpp=float(mpp), size=int(size), overlap=int(overlap), level0_size=side0,
                     coords=coords.astype(np.int64), tissue=frac[iy, ix].astype(np.float32),
                     slide_dimensions=(int(w0), int(h0)),
                     info={"tiles_considered": int(frac.size),
                           "tissue_fraction": round(float(m.mean()), 4),
                           "mask_downsample": round(float(ds), 3), "min_tissue": min_tissue,
                           "slide_mpp": float(slide.mpp)})


def iter_tiles(slide: Any, index: TileIndex, batch_size: int = 32
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(coords (B, 2), tiles (B, size, size, 3) uint8)`` batches in index order."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, len(index), batch_size):
        xy = index.coords[start:start + batch_size]
        tiles = np.stack([slide.read_at_mpp((int(x), int(y)), index.mpp, index.size)
                          for x, y in xy])
        yield xy, tiles
