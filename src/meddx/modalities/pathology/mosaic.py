"""Slides of known label built from labelled tiles: mosaics for measuring slide-level models.

A mosaic is a ``grid`` x ``grid`` arrangement of real tiles. A positive mosaic holds between 1
and ``max_positive`` tiles of the positive tile class (at random places) among negative tiles;
a negative mosaic holds none. The slide label is therefore known exactly, and the task is the
multiple-instance one (find the few tiles that decide) rather than a whole-slide impression.

Plans are deterministic: the same tiles (in any order) and seed give the same mosaics. Draw the
test mosaics from held-out tiles only, so no tile a slide model or its encoder saw in training
reaches a test slide.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meddx.errors import ConfigError, DataError

__all__ = ["Mosaic", "plan_mosaics", "compose", "write_mosaics"]


@dataclass(frozen=True)
class Mosaic:
    """One planned slide: its name, label, tiles (row-major) and how many are positive."""

    name: str
    label: str
    tiles: tuple[str, ...]
    positives: int


def plan_mosaics(tiles: Sequence[tuple[str, str]], n: int, *, grid: int, positive: str,
                 slide_labels: tuple[str, str] = ("negative", "positive"),
                 max_positive: int = 3, seed: int = 0, prefix: str = "m") -> list[Mosaic]:
    """Plan ``n`` mosaics (alternately negative and positive) from ``(tile, tile_label)`` pairs.

    Args:
        tiles: the pool; a tile is positive when its label equals ``positive``.
        n: number of mosaics.
        grid: tiles per side.
        positive: the positive tile label.
        slide_labels: (negative, positive) slide labels.
        max_positive: most positive tiles in a positive mosaic (at least 1).
        seed: the plan's seed.
        prefix: name prefix (``m000``, ``m001`` …).

    Raises:
        ConfigError: bad sizes; DataError: the pool lacks positive or enough negative tiles.
    """
    if n < 1 or grid < 1 or not 1 <= max_positive <= grid * grid:
        raise ConfigError(f"bad mosaic plan: n={n}, grid={grid}, max_positive={max_positive}",
                          hint="n and grid at least 1; 1 <= max_positive <= grid*grid")
    pool = sorted(set(tiles))
    pos = [t for t, y in pool if y == positive]
    neg = [t for t, y in pool if y != positive]
    cells = grid * grid
    if not pos:
        raise DataError(f"no tile labelled {positive!r} in the pool of {len(pool)}")
    if len(neg) < cells:
        raise DataError(f"{len(neg)} negative tiles cannot fill a {grid}x{grid} mosaic")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(1, min(max_positive, len(pos)) + 1)) if i % 2 else 0
        chosen = [pos[j] for j in rng.choice(len(pos), k, replace=False)]
        chosen += [neg[j] for j in rng.choice(len(neg), cells - k, replace=False)]
        order = rng.permutation(cells)
        out.append(Mosaic(f"{prefix}{i:03d}", slide_labels[int(k > 0)],
                          tuple(chosen[j] for j in order), k))
    return out


def compose(mosaic: Mosaic, read_tile: Callable[[str], np.ndarray]) -> np.ndarray:
    """The mosaic's RGB pixels; every tile must be square and of one size."""
    arrays = [np.asarray(read_tile(t)) for t in mosaic.tiles]
    side = arrays[0].shape[0]
    if any(a.shape != (side, side, 3) for a in arrays):
        raise DataError(f"mosaic {mosaic.name}: tiles differ in size or are not RGB squares")
    grid = int(round(len(arrays) ** 0.5))
    rows = [np.concatenate(arrays[r * grid:(r + 1) * grid], axis=1) for r in range(grid)]
    return np.ascontiguousarray(np.concatenate(rows, axis=0).astype(np.uint8))


def write_mosaics(mosaics: Sequence[Mosaic], folder: str | Path,
                  read_tile: Callable[[str], np.ndarray], mpp: float,
                  split: str | None = None) -> list[str]:
    """Write each mosaic as a tiled TIFF carrying ``mpp``; returns ``slide,label[,split]`` rows."""
    import tifffile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for m in mosaics:
        rgb = compose(m, read_tile)
        tile = 16 * max(1, min(rgb.shape[:2]) // 64)
        with tifffile.TiffWriter(folder / f"{m.name}.tiff") as tif:
            tif.write(rgb, photometric="rgb", tile=(tile, tile), compression="zlib",
                      resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
        rows.append(f"{m.name}.tiff,{m.label}" + (f",{split}" if split else ""))
    return rows
