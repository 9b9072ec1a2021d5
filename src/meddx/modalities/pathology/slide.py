"""Whole-slide images: one reader over OpenSlide, tiffslide and wsidicom.

:func:`open_slide` gives a :class:`Slide` with the pyramid's levels and downsamples, the
resolution in µm per pixel at level 0 (from the file, or given by the user for files that do
not say), the names of the associated images, and RGB regions at a level or at a requested
resolution. Vendor formats (Aperio ``.svs``, Hamamatsu ``.ndpi``, MIRAX ``.mrxs``, generic tiled
TIFF …) are read with OpenSlide (the ``openslide-bin`` wheel, no system library), with tiffslide
(pure Python over tifffile) where OpenSlide is missing or refuses the file, and DICOM WSI (a
folder of ``.dcm`` instances, or one) with wsidicom.

The associated images (label, macro) can carry the patient's name or a barcode: a Slide lists
their names only, and nothing in meddx reads, writes or serves them.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from meddx.errors import ConfigError, DataError

__all__ = ["Slide", "open_slide", "SLIDE_MPP_FLAG"]

logger = logging.getLogger(__name__)

#: the command-line flag that gives a slide's own resolution (named in the error for files
#: that do not say theirs)
SLIDE_MPP_FLAG = "--slide-mpp"
_MAX_READ_PIXELS = 64_000_000  # one read_region call; tiles and thumbnail strips stay far below


class Slide:
    """An open whole-slide image (read-only). Use as a context manager or call :meth:`close`.

    Attributes:
        path: the file (or DICOM folder).
        backend: ``openslide``, ``tiffslide`` or ``wsidicom``.
        dimensions: level-0 ``(width, height)``.
        level_dimensions: ``(width, height)`` per level, finest first.
        level_downsamples: downsample of each level against level 0.
        mpp: µm per pixel at level 0.
        associated_names: names of the associated images (never read by meddx).
    """

    def __init__(self, path: Path, backend: str, handle: Any, mpp: float,
                 associated_names: list[str]) -> None:
        self.path = path
        self.backend = backend
        self._h = handle
        self.mpp = float(mpp)
        self.associated_names = associated_names
        if backend == "wsidicom":
            levels = list(handle.levels)
            self.level_dimensions = [(int(lv.size.width), int(lv.size.height)) for lv in levels]
        else:
            self.level_dimensions = [(int(w), int(h)) for w, h in handle.level_dimensions]
        w0 = self.level_dimensions[0][0]
        self.level_downsamples = [w0 / w for w, _ in self.level_dimensions]
        self.dimensions = self.level_dimensions[0]

    # ----------------------------------------------------------------- context
    def __enter__(self) -> Slide:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Release the file."""
        with contextlib.suppress(Exception):  # a broken handle must not mask the real error
            self._h.close()

    def __repr__(self) -> str:
        return (f"Slide({self.path.name!r}, {self.backend}, {self.dimensions[0]}x"
                f"{self.dimensions[1]} at {self.mpp:.3f} µm/px, {len(self.level_dimensions)} levels)")

    # ----------------------------------------------------------------- reading
    def read_region(self, xy0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """``(h, w, 3)`` uint8 RGB of ``size`` pixels of ``level`` whose top-left corner is
        ``xy0`` in level-0 pixels; outside the slide or transparent reads as white."""
        if not 0 <= level < len(self.level_dimensions):
            raise ConfigError(f"the slide has levels 0..{len(self.level_dimensions) - 1}, "
                              f"not {level}")
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0 or w * h > _MAX_READ_PIXELS:
            raise ConfigError(f"cannot read a {w}x{h} region at once",
                              hint="read tiles (meddx wsi tiles) or a thumbnail instead")
        x, y = int(xy0[0]), int(xy0[1])
        try:
            if self.backend == "wsidicom":
                ds = self.level_downsamples[level]
                lv = self._h.levels[level].level
                region = self._h.read_region((round(x / ds), round(y / ds)), lv, (w, h))
                arr = np.asarray(region)
            elif self.backend == "tiffslide":
                arr = np.asarray(self._h.read_region((x, y), level, (w, h), as_array=True))
            else:
                arr = np.asarray(self._h.read_region((x, y), level, (w, h)))
        except (ConfigError, DataError):
            raise
        except Exception as e:  # the readers raise their own classes for broken tiles
            raise DataError(f"cannot read the slide region at ({x}, {y}), level {level}: "
                            f"{type(e).__name__}: {e}", path=self.path.name) from e
        return _rgb(arr)

    def best_level(self, downsample: float) -> int:
        """The coarsest level at or finer than ``downsample`` (never upsampling)."""
        ok = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * (1 + 1e-6)]
        return max(ok) if ok else 0

    def read_at_mpp(self, xy0: tuple[int, int], mpp: float,
                    size: int | tuple[int, int]) -> np.ndarray:
        """``(h, w, 3)`` uint8 RGB of ``size`` pixels at ``mpp`` µm/px, top-left ``xy0`` in
        level-0 pixels: read from the closest level at or finer than ``mpp``, then resized.

        Raises:
            ConfigError: ``mpp`` finer than the slide's own (that would invent detail).
        """
        w, h = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if mpp < self.mpp * (1 - 1e-3):
            raise ConfigError(f"the slide is scanned at {self.mpp:.3f} µm/px; tiles at "
                              f"{mpp:g} µm/px would be upsampled",
                              hint=f"ask for {self.mpp:.3f} µm/px or coarser")
        target = mpp / self.mpp
        level = self.best_level(target)
        scale = target / self.level_downsamples[level]
        rw, rh = max(1, round(w * scale)), max(1, round(h * scale))
        region = self.read_region(xy0, level, (rw, rh))
        if (rw, rh) == (w, h):
            return region
        from PIL import Image

        return np.asarray(Image.fromarray(region).resize((w, h), Image.BILINEAR))

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """The whole slide as ``(h, w, 3)`` uint8 with its longer side ``max_side`` (or the
        coarsest level's size when that is smaller), read in strips: memory stays bounded by
        one strip of the level read, whatever the slide's size."""
        from PIL import Image

        w0, h0 = self.dimensions
        scale0 = min(1.0, max_side / max(w0, h0))
        out_w, out_h = max(1, round(w0 * scale0)), max(1, round(h0 * scale0))
        level = self.best_level(1 / scale0)
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        rows = max(1, min(lh, 4_000_000 // max(1, lw)))  # a strip of ≤ 4 Mpx of the level
        strips = []
        for top in range(0, lh, rows):
            n = min(rows, lh - top)
            strip = self.read_region((0, round(top * ds)), level, (lw, n))
            target_h = max(1, round(out_h * (top + n) / lh) - round(out_h * top / lh))
            strips.append(np.asarray(Image.fromarray(strip).resize((out_w, target_h),
                                                                     Image.BOX)))
        return np.concatenate(strips, axis=0)


def _rgb(arr: np.ndarray) -> np.ndarray:
    """RGB uint8 from RGB/RGBA (transparent = white, as OpenSlide leaves empty areas)."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[-1] == 4:
        alpha = arr[..., 3:4].astype(np.float32) / 255.0
        rgb = arr[..., :3].astype(np.float32) * alpha + 255.0 * (1 - alpha)
        return rgb.round().astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3]).astype(np.uint8, copy=False)


def _positive(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) and v > 0 else None


def _open_openslide(path: Path) -> tuple[Any, float | None, list[str]] | None:
    try:
        import openslide
    except ImportError:  # openslide-bin missing: tiffslide reads TIFF-based slides
        return None
    try:
        h = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        return None
    except openslide.OpenSlideError as e:
        raise DataError(f"the slide file is damaged or incomplete: {e}", path=path.name,
                        hint="copy the file again from the scanner or archive") from e
    props = h.properties
    mpp = _positive(props.get("openslide.mpp-x"))
    return h, mpp, sorted(h.associated_images.keys())


def _open_tiffslide(path: Path) -> tuple[Any, float | None, list[str]]:
    try:
        import tiffslide
    except ImportError as e:
        raise DataError("cannot read this slide: neither OpenSlide nor tiffslide is installed",
                        hint="pip install 'meddx[pathology]'") from e
    try:
        h = tiffslide.TiffSlide(str(path))
        h.level_dimensions  # noqa: B018 — forces the pyramid to be parsed now
    except Exception as e:  # tifffile raises several classes for damaged files
        raise DataError(f"not a readable whole-slide image ({type(e).__name__}: {e})",
                        path=path.name,
                        hint="supported: Aperio .svs, generic tiled TIFF, Hamamatsu .ndpi, "
                        "MIRAX .mrxs and other OpenSlide formats, DICOM WSI") from e
    mpp = _positive(h.properties.get("tiffslide.mpp-x"))
    names = sorted(getattr(h, "associated_images", {}).keys())
    return h, mpp, names


def _open_dicom(path: Path) -> tuple[Any, float | None, list[str]]:
    try:
        from wsidicom import WsiDicom
    except ImportError as e:
        raise DataError("DICOM whole-slide images need wsidicom",
                        hint="pip install 'meddx[pathology]'") from e
    try:
        h = WsiDicom.open(str(path))
    except Exception as e:  # wsidicom/pydicom raise several classes
        raise DataError(f"not a readable DICOM whole-slide image ({type(e).__name__}: {e})",
                        path=path.name) from e
    mpp = None
    try:
        mpp = _positive(h.levels[0].mpp.width)
    except Exception:  # noqa: BLE001 — no pixel spacing: the caller names --slide-mpp
        mpp = None
    names = [n for n in ("label", "overview") if getattr(h, f"{n}s", None)]
    return h, mpp, names


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open a whole-slide image.

    Args:
        path: a slide file, or a folder (or a file) of DICOM WSI instances.
        mpp: µm per pixel at level 0, for a file that does not say; overrides nothing when
            the file says (a different value is logged and the file's own is kept).

    Raises:
        DataError: missing or unreadable file (naming it and what failed); a file without
            a resolution and no ``mpp`` given (naming ``--slide-mpp``).
    """
    p = Path(path)
    if not p.exists():
        raise DataError("slide not found", path=str(p))
    if mpp is not None and _positive(mpp) is None:
        raise ConfigError(f"the slide resolution must be a positive number of µm/px, got {mpp}")
    if p.is_dir() or p.suffix.lower() == ".dcm":
        backend, opened = "wsidicom", _open_dicom(p)
    else:
        found = _open_openslide(p)
        backend, opened = ("openslide", found) if found is not None else (
            "tiffslide", _open_tiffslide(p))
        if found is not None and found[0].properties.get("openslide.vendor") == "generic-tiff":
            # OpenSlide's generic TIFF ignores pyramids kept in SubIFDs (OME-TIFF and many
            # converters write them so): tiffslide reads those levels
            other = _open_tiffslide(p)
            if len(other[0].level_dimensions) > len(found[0].level_dimensions):
                found[0].close()
                backend, opened = "tiffslide", other
            else:
                other[0].close()
    handle, own_mpp, names = opened
    if own_mpp is None and mpp is None:
        with contextlib.suppress(Exception):
            handle.close()
        raise DataError("the slide does not say its resolution (µm per pixel at level 0)",
                        path=p.name, hint=f"give it with {SLIDE_MPP_FLAG} (e.g. 0.25 for a 40x "
                        "scan, 0.5 for 20x)")
    if own_mpp is not None and mpp is not None and abs(own_mpp - mpp) > 1e-3 * own_mpp:
        logger.warning("%s says %.4f µm/px; the given %.4f is ignored", p.name, own_mpp, mpp)
    return Slide(p, backend, handle, own_mpp if own_mpp is not None else float(mpp),  # type: ignore[arg-type]
                 names)
