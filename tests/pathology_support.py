"""Helpers for pathology tests: tiny synthetic whole-slide images written with tifffile.

``write_pyramid(path, rgb)`` writes any RGB array as a tiled pyramidal TIFF that OpenSlide
(``generic-tiff``) and TiffSlide both open; ``synthetic_tissue`` draws a slide with a known
rectangle of H&E-coloured "tissue" on white glass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["write_pyramid", "synthetic_tissue", "truncate"]


def _halve(rgb: np.ndarray) -> np.ndarray:
    """2x2 mean (odd edges cropped), the way scanners build their pyramids."""
    h, w = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
    blocks = rgb[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).astype(np.uint16)
    return (blocks.sum(axis=(1, 3)) // 4).astype(np.uint8)


def write_pyramid(path: str | Path, rgb: np.ndarray, mpp: float | None = 0.5, levels: int = 3,
                  *, tile: int = 64, compression: str | None = "zlib",
                  subifds: bool = False, dpi: float | None = None) -> Path:
    """Write ``rgb`` as a tiled pyramidal TIFF.

    Args:
        path: file to write (``.tif`` / ``.tiff``).
        rgb: ``(h, w, 3)`` uint8 level 0 (any size).
        mpp: µm per pixel of level 0, written as the TIFF resolution (pixels per cm); None
            writes no resolution, so readers find no mpp.
        levels: pyramid levels, each half the previous (stops when a side would be < 1).
        tile: tile side (a multiple of 16).
        compression: ``"zlib"`` (lossless: pixels read back exactly), ``"jpeg"``, or None.
        subifds: put the reduced levels in SubIFDs of level 0 (TiffSlide reads them; OpenSlide
            then sees level 0 only) instead of one page per level (both read them).

    Returns:
        ``path``.
    """
    import tifffile

    path = Path(path)
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected (h, w, 3) uint8, got {rgb.shape}")
    pyramid = [rgb]
    while len(pyramid) < levels and min(pyramid[-1].shape[:2]) >= 2:
        pyramid.append(_halve(pyramid[-1]))
    options = {"tile": (tile, tile), "photometric": "rgb", "compression": compression}
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        for i, level in enumerate(pyramid):
            extra: dict = {}
            if dpi is not None:
                extra.update(resolution=(dpi, dpi), resolutionunit="INCH")
            elif mpp is not None:
                ppcm = 1e4 / (mpp * rgb.shape[1] / level.shape[1])
                extra.update(resolution=(ppcm, ppcm), resolutionunit="CENTIMETER")
            if i == 0 and subifds and len(pyramid) > 1:
                extra["subifds"] = len(pyramid) - 1
            if i > 0:
                extra["subfiletype"] = 1  # reduced-resolution image
            tif.write(level, **options, **extra)
    return path


def synthetic_tissue(shape: tuple[int, int] = (512, 768),
                     box: tuple[int, int, int, int] = (128, 64, 384, 320),
                     seed: int = 0) -> np.ndarray:
    """White glass with one rectangle of pink-purple "tissue".

    Args:
        shape: ``(height, width)``.
        box: tissue rectangle ``(x0, y0, x1, y1)`` in pixels (clipped to the image).
        seed: noise seed.

    Returns:
        ``(h, w, 3)`` uint8 RGB.
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    out = np.clip(rng.normal(242, 3, (h, w, 3)), 0, 255).astype(np.uint8)
    x0, y0 = max(0, box[0]), max(0, box[1])
    x1, y1 = min(w, box[2]), min(h, box[3])
    eosin = np.array([220, 120, 170], np.float32)
    haem = np.array([90, 60, 150], np.float32)
    mix = rng.uniform(0, 1, (y1 - y0, x1 - x0, 1)).astype(np.float32)
    tissue = mix * haem + (1 - mix) * eosin + rng.normal(0, 8, (y1 - y0, x1 - x0, 3))
    out[y0:y1, x0:x1] = np.clip(tissue, 0, 255).astype(np.uint8)
    return out


def truncate(src: str | Path, dst: str | Path, fraction: float = 0.5) -> Path:
    """Copy the first ``fraction`` of a file's bytes: a slide cut short mid-transfer."""
    data = Path(src).read_bytes()
    dst = Path(dst)
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst
