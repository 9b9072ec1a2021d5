"""Whole-slide images: one read-only :class:`Slide` over OpenSlide, TiffSlide and wsidicom.

Vendor formats (Aperio SVS, Hamamatsu, MIRAX, generic tiled TIFF …) are read with
``openslide-python`` (its library comes from the ``openslide-bin`` wheel, so nothing has to be
installed on the system); files OpenSlide does not support, or machines where it does not
import, fall back to ``tiffslide`` (pure Python over ``tifffile``); DICOM WSI (a folder of
``.dcm`` instances, or ``.dcm`` files) goes through ``wsidicom``. All three are imported on first
use, so ``import meddx`` stays fast.

Every read returns ``(h, w, 3)`` uint8 RGB; pixels outside the slide are white (255), the colour of
glass, whatever the backend does at the border. Coordinates handed to a :class:`Slide` are level-0
pixels, as in OpenSlide.

Associated images (label, macro, the scanner's own thumbnail) carry patient identifiers: a slide
exposes their *names* only (:attr:`Slide.associated_names`); nothing in meddx reads, exports or
serves their pixels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from meddx.errors import ConfigError, DataError

__all__ = ["Slide", "open_slide", "BACKENDS", "MPP_FLAG"]

logger = logging.getLogger(__name__)

BACKENDS = ("openslide", "tiffslide", "wsidicom")
# the CLI flag that gives a slide's own resolution (``--mpp`` is the resolution tiles are cut at)
MPP_FLAG = "--slide-mpp"
# a level is "at" a resolution when its downsample is within 1 % (Aperio levels are 4.0003 …)
_LEVEL_TOLERANCE = 1.01
# blocks read for a thumbnail are at most this many level pixels on a side (bounded memory)
_BLOCK = 1024
# A microscope scans at about 0.1-10 µm/px (a 1.25x overview is ~8). TIFF writers that know
# nothing of microscopes store a screen or print default instead (72, 96, 300 dpi …: 353, 265,
# 85 µm/px): such a tag is no resolution at all, and is treated as absent (--slide-mpp asked for).
MAX_SCAN_MPP = 20.0
_DEFAULT_DPI = frozenset({72, 96, 100, 120, 144, 150, 180, 200, 240, 300, 360, 400, 600, 720,
                          1200, 2400, 4800})


class _Reader:
    """What a backend gives :class:`Slide`: levels, resolution and RGB reads at a level."""

    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    mpp: float | None
    # why a resolution the file records was not taken (a screen/print default), else None
    mpp_ignored: str | None = None
    associated_names: list[str]

    def read(self, xy0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 of ``size`` at ``level``, top-left ``xy0`` in level-0 pixels (in bounds)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def _positive(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def _mpp_xy(x: Any, y: Any, path: Path) -> float | None:
    mx, my = _positive(x), _positive(y)
    if mx and my and abs(mx - my) > 0.01 * max(mx, my):
        logger.warning("%s: pixels are not square (%.4f x %.4f µm); using their mean",
                       path.name, mx, my)
        return (mx + my) / 2
    return mx or my


def _scan_mpp(mpp: float | None, props: Any, path: Path) -> tuple[float | None, str | None]:
    """``(mpp, None)`` for a plausible microscope resolution; ``(None, why)`` for a tag that
    looks like a screen or print default (its unit inch at a common dpi, or coarser than
    :data:`MAX_SCAN_MPP`)."""
    if mpp is None:
        return None, None
    unit = str(props.get("tiff.ResolutionUnit") or "").lower() if props is not None else ""
    dpi = _positive(props.get("tiff.XResolution")) if props is not None else None
    why = None
    if unit == "inch" and dpi is not None and round(dpi) in _DEFAULT_DPI \
            and abs(dpi - round(dpi)) < 1e-6:
        why = f"its resolution tag says {dpi:g} dpi, a screen or print default"
    elif mpp > MAX_SCAN_MPP:
        why = f"its resolution tag says {mpp:.4g} µm/px, coarser than any microscope scan"
    if why is None:
        return mpp, None
    logger.debug("%s: %s; taken as no resolution", path.name, why)
    return None, why


def _rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite RGBA (OpenSlide's output) on white: transparent pixels are glass."""
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha[..., None].astype(np.float32) / 255.0
    out = rgba[..., :3].astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class _OpenSlideReader(_Reader):
    def __init__(self, path: Path, module: Any) -> None:
        self._slide = module.OpenSlide(str(path))
        self.level_dimensions = [tuple(map(int, d)) for d in self._slide.level_dimensions]
        self.level_downsamples = [float(d) for d in self._slide.level_downsamples]
        props = self._slide.properties
        self.mpp, self.mpp_ignored = _scan_mpp(
            _mpp_xy(props.get("openslide.mpp-x"), props.get("openslide.mpp-y"), path), props, path)
        self.associated_names = sorted(self._slide.associated_images.keys())

    def read(self, xy0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        image = self._slide.read_region(xy0, level, size)
        return _rgba_to_rgb(np.asarray(image))

    def close(self) -> None:
        self._slide.close()


class _TiffSlideReader(_Reader):
    def __init__(self, path: Path, module: Any) -> None:
        self._slide = module.TiffSlide(str(path))
        self.level_dimensions = [tuple(map(int, d)) for d in self._slide.level_dimensions]
        self.level_downsamples = [float(d) for d in self._slide.level_downsamples]
        props = self._slide.properties
        self.mpp, self.mpp_ignored = _scan_mpp(
            _mpp_xy(props.get("tiffslide.mpp-x"), props.get("tiffslide.mpp-y"), path), props, path)
        self.associated_names = sorted(self._slide.associated_images.keys())

    def read(self, xy0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        array = self._slide.read_region(xy0, level, size, as_array=True, padding=False)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        if array.shape[-1] == 4:
            return _rgba_to_rgb(array)
        return np.ascontiguousarray(array[..., :3]).astype(np.uint8, copy=False)

    def close(self) -> None:
        self._slide.close()


class _WsiDicomReader(_Reader):
    def __init__(self, path: Path | Sequence[Path], module: Any) -> None:
        source = [str(p) for p in path] if isinstance(path, list | tuple) else str(path)
        self._wsi = module.WsiDicom.open(source)
        levels = list(self._wsi.levels)
        base = levels[0].size
        self._levels = [lvl.level for lvl in levels]  # wsidicom's level number: log2 downsample
        self.level_dimensions = [(int(lvl.size.width), int(lvl.size.height)) for lvl in levels]
        self.level_downsamples = [base.width / lvl.size.width for lvl in levels]
        mpp = self._wsi.mpp
        first = Path(source[0] if isinstance(source, list) else source)
        self.mpp, self.mpp_ignored = _scan_mpp(
            _mpp_xy(mpp.width, mpp.height, first) if mpp else None, None, first)
        names = []
        if self._wsi.labels:
            names.append("label")
        if self._wsi.overviews:
            names.append("macro")
        if getattr(self._wsi.pyramid, "thumbnails", None):
            names.append("thumbnail")
        self.associated_names = names

    def read(self, xy0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        ds = self.level_downsamples[level]
        location = (int(round(xy0[0] / ds)), int(round(xy0[1] / ds)))
        array = self._wsi.read_region(location, self._levels[level], size, as_array=True)
        array = np.asarray(array)
        if array.shape[-1] == 4:
            return _rgba_to_rgb(array)
        return np.ascontiguousarray(array[..., :3]).astype(np.uint8, copy=False)

    def close(self) -> None:
        self._wsi.close()


def _is_dicom(path: Path) -> bool:
    if path.is_dir():
        return True
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _prefer_subifd_pyramid(path: Path, reader: Any) -> Any:
    """OpenSlide's generic TIFF ignores pyramid levels kept in SubIFDs (as OME-TIFF and many
    converters write them): when tiffslide sees more levels of the same file, read with it."""
    if reader._slide.properties.get("openslide.vendor") != "generic-tiff":
        return reader
    try:
        import tiffslide

        other = _TiffSlideReader(path, tiffslide)
    except Exception:  # noqa: BLE001 — tiffslide cannot read it: OpenSlide it is
        return reader
    if len(other.level_dimensions) > len(reader.level_dimensions):
        reader.close()
        return other
    other.close()
    return reader


def _open_reader(path: Path, backend: str | None) -> tuple[str, _Reader]:
    """The first backend that opens ``path``; DataError listing what each one said."""
    if backend is not None and backend not in BACKENDS:
        raise ConfigError(f"unknown slide backend '{backend}'; choose one of {list(BACKENDS)}")
    if backend is None:
        order = ["wsidicom"] if _is_dicom(path) else ["openslide", "tiffslide"]
    else:
        order = [backend]
    failures = []
    for name in order:
        try:
            module = __import__(name)
        except (ImportError, OSError) as e:  # openslide raises OSError without its library
            failures.append(f"{name} is not usable here ({e})")
            continue
        readers = {"openslide": _OpenSlideReader, "tiffslide": _TiffSlideReader,
                   "wsidicom": _WsiDicomReader}
        try:
            reader = readers[name](path, module)
            if name == "openslide" and backend is None:
                reader = _prefer_subifd_pyramid(path, reader)
            return ("tiffslide" if isinstance(reader, _TiffSlideReader) else name), reader
        except Exception as e:  # every backend has its own exception types
            failures.append(f"{name}: {type(e).__name__}: {e}".rstrip(": "))
    raise DataError(
        "cannot read the slide: " + "; ".join(failures),
        hint="is it a whole-slide image (SVS, NDPI, MRXS, tiled TIFF, DICOM WSI) and complete?",
        path=str(path),
    )


class Slide:
    """A whole-slide image, read-only, opened by :func:`open_slide`; use it as a context manager.

    Attributes:
        path: the file (or DICOM folder).
        backend: ``"openslide"``, ``"tiffslide"`` or ``"wsidicom"``.
        dimensions: level-0 ``(width, height)``.
        level_dimensions: ``(width, height)`` of every level, finest first.
        level_downsamples: each level's downsample against level 0.
        mpp: microns per pixel at level 0 (from the file, or as given to :func:`open_slide`).
        associated_names: names of the associated images (label, macro, thumbnail). They may show
            patient identifiers, so only their names are exposed: never their pixels.

    Reads are not promised to be thread-safe: give each thread its own :class:`Slide`.
    """

    def __init__(self, path: Path, backend: str, reader: _Reader, mpp: float) -> None:
        self.path = path
        self.backend = backend
        self._reader = reader
        self.level_dimensions = list(reader.level_dimensions)
        self.level_downsamples = list(reader.level_downsamples)
        self.dimensions = self.level_dimensions[0]
        self.mpp = float(mpp)
        self.associated_names = list(reader.associated_names)
        self._warned_upsampling = False

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return (f"Slide({self.path.name!r}, backend={self.backend!r}, {w}x{h}, "
                f"levels={len(self.level_dimensions)}, mpp={self.mpp:.4g})")

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_dimensions)

    def read_region(self, xy0: tuple[int, int], level: int,
                    size: tuple[int, int]) -> np.ndarray:
        """Pixels of ``level`` as ``(h, w, 3)`` uint8 RGB.

        Args:
            xy0: top-left corner in level-0 pixels (may lie partly outside the slide).
            level: pyramid level index (0 is the finest).
            size: ``(width, height)`` in pixels of ``level``.

        Raises:
            ConfigError: level or size out of range.
            DataError: the file could not be decoded there (truncated or corrupt).
        """
        if not 0 <= level < self.level_count:
            raise ConfigError(f"slide has no level {level}; it has {self.level_count}",
                              path=self.path.name)
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise ConfigError(f"region size must be positive, got {w}x{h}")
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        # the request in level pixels, clipped to the level; the rest stays white
        x, y = int(math.floor(xy0[0] / ds)), int(math.floor(xy0[1] / ds))
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x0 == x and y0 == y and x1 == x + w and y1 == y + h:
            return self._read((int(xy0[0]), int(xy0[1])), level, (w, h))
        out = np.full((h, w, 3), 255, np.uint8)
        if x1 > x0 and y1 > y0:
            part = self._read((int(round(x0 * ds)), int(round(y0 * ds))), level,
                              (x1 - x0, y1 - y0))
            out[y0 - y:y1 - y, x0 - x:x1 - x] = part
        return out

    def _read(self, xy0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        try:
            array = self._reader.read(xy0, level, size)
        except Exception as e:  # backends raise their own types (OpenSlideError, TiffFileError …)
            raise DataError(f"cannot decode the slide at level {level}, x={xy0[0]}, "
                            f"y={xy0[1]}: {type(e).__name__}: {e}",
                            hint="the file may be truncated or corrupt",
                            path=str(self.path)) from e
        if array.shape != (size[1], size[0], 3):
            raise DataError(f"slide backend returned {array.shape} for a {size} region",
                            path=str(self.path))
        return array

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample is at most ``downsample`` (1 % tolerance)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * _LEVEL_TOLERANCE and ds >= self.level_downsamples[best]:
                best = i
        return best

    def read_at_mpp(self, xy0: tuple[int, int], mpp: float,
                    size: int | tuple[int, int]) -> np.ndarray:
        """A region at a requested resolution as ``(h, w, 3)`` uint8 RGB.

        Reads the coarsest level at or finer than ``mpp`` and resizes it (antialiased bilinear)
        to ``size``; nothing is resized when a level is at ``mpp`` already.

        Args:
            xy0: top-left corner in level-0 pixels.
            mpp: microns per pixel of the result.
            size: side, or ``(width, height)``, of the result in pixels at ``mpp``.
        """
        if not (mpp > 0 and math.isfinite(mpp)):
            raise ConfigError(f"mpp must be a positive number, got {mpp}")
        w, h = (size, size) if isinstance(size, int | np.integer) else (int(size[0]),
                                                                          int(size[1]))
        factor = mpp / self.mpp  # downsample against level 0
        if factor < 1 / _LEVEL_TOLERANCE and not self._warned_upsampling:
            logger.warning("%s: %.3g µm/px requested, finer than the slide's %.3g: upsampling",
                           self.path.name, mpp, self.mpp)
            self._warned_upsampling = True
        level = self.best_level(factor)
        scale = factor / self.level_downsamples[level]  # level pixels per output pixel
        lw, lh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
        region = self.read_region(xy0, level, (lw, lh))
        if (lw, lh) == (w, h):
            return region
        from PIL import Image

        return np.asarray(Image.fromarray(region).resize((w, h), Image.Resampling.BILINEAR))

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """The whole slide, longest side ``max_side`` (never upsampled), as ``(h, w, 3)`` uint8.

        Read from the coarsest level that is fine enough, block by block (at most 1024 level
        pixels a side at a time), so memory stays bounded even on a slide without a pyramid.
        """
        if max_side < 1:
            raise ConfigError(f"max_side must be positive, got {max_side}")
        from PIL import Image

        W, H = self.dimensions
        ds = max(1.0, max(W, H) / max_side)
        out_w, out_h = max(1, int(round(W / ds))), max(1, int(round(H / ds)))
        level = self.best_level(ds)
        lds = self.level_downsamples[level]
        rx = W / lds / out_w  # level pixels per output pixel, per axis
        ry = H / lds / out_h
        step = max(1, int(_BLOCK / max(rx, ry)))  # output pixels per block side
        out = np.empty((out_h, out_w, 3), np.uint8)
        for oy in range(0, out_h, step):
            oy1 = min(oy + step, out_h)
            for ox in range(0, out_w, step):
                ox1 = min(ox + step, out_w)
                lx0, ly0 = int(round(ox * rx)), int(round(oy * ry))
                lx1, ly1 = max(lx0 + 1, int(round(ox1 * rx))), max(ly0 + 1, int(round(oy1 * ry)))
                block = self.read_region((int(round(lx0 * lds)), int(round(ly0 * lds))), level,
                                         (lx1 - lx0, ly1 - ly0))
                if block.shape[:2] != (oy1 - oy, ox1 - ox):
                    block = np.asarray(Image.fromarray(block).resize(
                        (ox1 - ox, oy1 - oy), Image.Resampling.BOX))
                out[oy:oy1, ox:ox1] = block
        return out

    def close(self) -> None:
        """Release the file."""
        self._reader.close()


def open_slide(path: str | Path, mpp: float | None = None, *,
               backend: str | None = None) -> Slide:
    """Open a whole-slide image.

    Args:
        path: a slide file, or a DICOM WSI folder / ``.dcm`` file.
        mpp: microns per pixel at level 0; overrides the file's value and is required when the
            file records none (the CLI's ``--slide-mpp``).
        backend: force ``"openslide"``, ``"tiffslide"`` or ``"wsidicom"``; by default OpenSlide,
            then TiffSlide for files OpenSlide does not support, and wsidicom for DICOM.

    Raises:
        DataError: the file is missing, unreadable or corrupt (the message names the file and
            what each backend said), or it has no resolution and ``mpp`` is None (the message
            names ``--slide-mpp``).
        ConfigError: ``mpp`` is not a positive number, or the backend is unknown.
    """
    path = Path(path)
    if not path.exists():
        raise DataError("slide not found", path=str(path))
    if mpp is not None and _positive(mpp) is None:
        raise ConfigError(f"the slide's mpp must be a positive number, got {mpp}")
    name, reader = _open_reader(path, backend)
    try:
        if not reader.level_dimensions or min(reader.level_dimensions[0]) < 1:
            raise DataError("slide has no image levels", path=str(path))
        file_mpp = reader.mpp
        if mpp is None and file_mpp is None:
            raise DataError(
                "the slide records no resolution (microns per pixel)" + (
                    f" that can be trusted ({reader.mpp_ignored})" if reader.mpp_ignored
                    else ""),
                hint=f"give it with {MPP_FLAG} (e.g. {MPP_FLAG} 0.25 for a 40x scan) or "
                "open_slide(path, mpp=0.25)",
                path=str(path),
            )
        if mpp is not None and file_mpp is not None and abs(mpp - file_mpp) > 0.01 * file_mpp:
            logger.warning("%s: using the given %.4g µm/px instead of the file's %.4g",
                           path.name, mpp, file_mpp)
        slide = Slide(path, name, reader, float(mpp if mpp is not None else file_mpp))
        # decode a pixel of the coarsest level and the middle of level 0 now: a truncated file
        # fails here, not mid-run
        slide.read_region((0, 0), slide.level_count - 1, (1, 1))
        slide.read_region((slide.dimensions[0] // 2, slide.dimensions[1] // 2), 0, (1, 1))
    except BaseException:
        reader.close()
        raise
    return slide
