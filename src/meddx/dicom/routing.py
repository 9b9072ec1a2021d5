"""Which model runs on which series: selection rules from a routing file and the package card.

A routing file (YAML) names, per model (the package card's ``name``), what it accepts::

    routes:
      - model: breast-tiny
        select:
          modality: [US]                       # (0008,0060)
          sop_class: [1.2.840.10008.5.1.4.1.1.6.1]
          body_part: [BREAST]                  # (0018,0015), case-insensitive
          photometric: [MONOCHROME2]           # (0028,0004)
          min_size: 16                         # Rows and Columns at least
          max_size: 4096
          series_description: "(?i)breast"     # regex searched in (0008,103E)
        aggregate: max                         # 2D models: study answer = max risk over images

What the card says always applies as well: a 3D model (``spatial_dims: 3``) takes a series of
single-frame slices as one volume, a 2D model takes each image; a one-channel model takes
MONOCHROME1/2 images, a three-channel one RGB/YBR; a whole-slide model (its modality reads
slides) takes a VL Whole Slide Microscopy series as one slide, and no other model takes such a
series. A series no model accepts is listed with
every model's reason, never dropped silently. Nothing here branches on a modality's name: only
DICOM attributes and the card decide.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from meddx.errors import ConfigError

__all__ = ["Selection", "Route", "RoutingConfig", "ModelSlot", "SeriesInfo", "load_routing",
           "choose", "series_info", "MEDDX_MANUFACTURER", "VL_WSM"]

# results meddx writes carry this Manufacturer; they are never analysed again
MEDDX_MANUFACTURER = "meddx"
#: VL Whole Slide Microscopy Image Storage: the SOP class of a DICOM whole-slide image
VL_WSM = "1.2.840.10008.5.1.4.1.1.77.1.6"
_GRAY = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "PALETTE COLOR")


class Selection(BaseModel):
    """DICOM attributes a model accepts (an empty list accepts anything)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    modality: tuple[str, ...] = ()
    sop_class: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    photometric: tuple[str, ...] = ()
    min_size: int = Field(1, ge=1)
    max_size: int = Field(65535, ge=1)
    series_description: str | None = None

    @field_validator("series_description")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"series_description is not a regular expression: {e}") from e
        return v


class Route(BaseModel):
    """One model's selection and how its per-image answers make the series answer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    select: Selection = Selection()
    aggregate: Literal["max", "mean"] = "max"


class RoutingConfig(BaseModel):
    """The routing file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    routes: tuple[Route, ...] = ()


def load_routing(path: str | Path | None) -> RoutingConfig:
    """Read a routing YAML (None: no file, the cards alone decide).

    Raises:
        ConfigError: unreadable file or invalid rules.
    """
    if path is None:
        return RoutingConfig()
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        return RoutingConfig.model_validate(data)
    except OSError as e:
        raise ConfigError(f"cannot read routing file: {e.strerror}", path=str(p)) from e
    except (yaml.YAMLError, ValidationError) as e:
        raise ConfigError(f"invalid routing file: {e}", path=str(p),
                          hint="see docs/pacs.md, section Routing") from e


@dataclass(frozen=True)
class ModelSlot:
    """What routing needs of one loaded model: its name, the card's input and its route
    (``slide``: the model reads whole-slide images, as its modality says)."""

    name: str
    spatial_dims: int
    channels: int
    route: Route
    slide: bool = False

    @classmethod
    def from_card(cls, card: Any, routing: RoutingConfig) -> ModelSlot:
        """From a package card; the card's name picks the routing file's rule, the card's
        modality (through the registry, never by name) says whether it reads slides."""
        from meddx.modalities import get_modality

        spec = card.preprocessing or {}
        route = next((r for r in routing.routes if r.model == card.name), Route(model=card.name))
        dims, modality = spec.get("spatial_dims"), getattr(card, "modality", None)
        return cls(name=card.name, spatial_dims=2 if dims is None else int(dims),
                   channels=int(spec.get("channels") or 1), route=route,
                   slide=bool(modality and get_modality(modality).reads_slides))


@dataclass(frozen=True)
class SeriesInfo:
    """The attributes routing looks at, read from a series' first header."""

    modality: str
    sop_class: str
    body_part: str
    photometric: str
    rows: int
    columns: int
    frames: int
    description: str
    has_pixels: bool
    manufacturer: str
    count: int


def series_info(ds: Any, count: int) -> SeriesInfo:
    """Routing attributes of a header (read with ``stop_before_pixels``) of a ``count``-
    instance series."""
    def get(name: str, default: Any = "") -> Any:
        v = ds.get(name, default)
        return default if v is None else v

    pixels = "Rows" in ds and "Columns" in ds
    return SeriesInfo(modality=str(get("Modality")), sop_class=str(get("SOPClassUID")),
                      body_part=str(get("BodyPartExamined")),
                      photometric=str(get("PhotometricInterpretation")),
                      rows=int(get("Rows", 0)), columns=int(get("Columns", 0)),
                      frames=int(get("NumberOfFrames", 1) or 1),
                      description=str(get("SeriesDescription")), has_pixels=pixels,
                      manufacturer=str(get("Manufacturer")), count=count)


def _card_reason(slot: ModelSlot, s: SeriesInfo) -> str | None:
    if slot.slide or s.sop_class == VL_WSM:
        if slot.slide and s.sop_class != VL_WSM:
            return (f"a whole-slide model takes VL Whole Slide Microscopy images; SOP Class "
                    f"{s.sop_class or '(none)'} is not one")
        if not slot.slide:
            return "a whole-slide image needs a whole-slide model; this one reads images"
        return None
    if slot.spatial_dims not in (2, 3):
        return f"the model reads no images (its input has {slot.spatial_dims} spatial dims)"
    if slot.channels == 1 and s.photometric not in _GRAY:
        return f"photometric {s.photometric or '(none)'} is not gray; the model takes 1 channel"
    if slot.channels == 3 and s.photometric not in _COLOUR + _GRAY:
        return f"photometric {s.photometric or '(none)'} is not an image the model can read"
    if slot.spatial_dims == 3 and s.frames == 1 and s.count < 2:
        return "a 3D model needs a volume: the series has one single-frame image"
    if slot.spatial_dims == 2 and s.frames > 1:
        return f"a 2D model takes single images; these have {s.frames} frames"
    return None


def _rule_reason(sel: Selection, s: SeriesInfo) -> str | None:
    checks = (("Modality", sel.modality, s.modality), ("SOP Class", sel.sop_class, s.sop_class),
              ("PhotometricInterpretation", sel.photometric, s.photometric))
    for name, allowed, value in checks:
        if allowed and value not in allowed:
            return f"{name} {value or '(none)'} not in {list(allowed)}"
    if sel.body_part and s.body_part.upper() not in {b.upper() for b in sel.body_part}:
        return f"BodyPartExamined {s.body_part or '(none)'} not in {list(sel.body_part)}"
    if not sel.min_size <= min(s.rows, s.columns) or max(s.rows, s.columns) > sel.max_size:
        return f"image size {s.rows}x{s.columns} outside {sel.min_size}..{sel.max_size}"
    if sel.series_description and not re.search(sel.series_description, s.description):
        return f"SeriesDescription does not match {sel.series_description!r}"
    return None


def choose(slots: list[ModelSlot], s: SeriesInfo) -> tuple[list[ModelSlot], str]:
    """The models that accept a series and, when none does, why (each model's reason).

    The first check is that the series holds images at all: a series without pixel data
    (an SR, a presentation state) is an unsupported SOP class for every model.
    """
    if s.manufacturer == MEDDX_MANUFACTURER:
        return [], "a meddx result, not analysed again"
    if not s.has_pixels:
        return [], f"SOP Class {s.sop_class} holds no image (unsupported SOP class)"
    accepted, reasons = [], []
    for slot in slots:
        why = _card_reason(slot, s) or _rule_reason(slot.route.select, s)
        if why is None:
            accepted.append(slot)
        else:
            reasons.append(f"{slot.name}: {why}")
    return accepted, "; ".join(reasons) if reasons else "no model loaded"
