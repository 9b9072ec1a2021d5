"""Tiny pyramidal TIFF slides written with tifffile, for the pathology tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_pyramid(path: str | Path, rgb: np.ndarray, mpp: float | None = 0.5, levels: int = 3,
                  tile: int = 256, compression: str = "zlib") -> Path:
    """Write ``rgb`` (``(h, w, 3)`` uint8) as a tiled generic TIFF pyramid: level 0 and
    ``levels - 1`` levels each downsampled 2× (as reduced-resolution pages), with resolution
    tags giving ``mpp`` µm per pixel at level 0 (none when ``mpp`` is None). Both OpenSlide
    (generic-tiff) and tiffslide read it as a pyramid."""
    import tifffile

    path = Path(path)
    opts: dict = {"tile": (tile, tile), "photometric": "rgb", "compression": compression}
    if mpp is not None:
        opts.update(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    img = np.ascontiguousarray(rgb, dtype=np.uint8)
    with tifffile.TiffWriter(path, bigtiff=img.size > 2**31) as tif:
        tif.write(img, **opts)
        for k in range(1, levels):
            f = 2**k
            h, w = img.shape[0] // f, img.shape[1] // f
            if min(h, w) < 16:
                break
            small = img[: h * f, : w * f].reshape(h, f, w, f, 3).mean(axis=(1, 3))
            if mpp is not None:
                opts.update(resolution=(1e4 / (mpp * f), 1e4 / (mpp * f)))
            tif.write(small.round().astype(np.uint8), subfiletype=1, **opts)
    return path


def tissue_slide(width: int = 1024, height: int = 768, box: tuple[int, int, int, int] | None = None,
                 seed: int = 0) -> np.ndarray:
    """White glass with one pink-purple tissue rectangle ``box`` = (x0, y0, x1, y1)."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 242, np.float32) + rng.normal(0, 2, (height, width, 3))
    x0, y0, x1, y1 = box or (width // 4, height // 4, 3 * width // 4, 3 * height // 4)
    patch = np.array([200, 120, 180], np.float32) + rng.normal(0, 12, (y1 - y0, x1 - x0, 3))
    img[y0:y1, x0:x1] = patch
    return np.clip(img, 0, 255).astype(np.uint8)
