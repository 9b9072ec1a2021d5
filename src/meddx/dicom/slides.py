"""Whole-slide images from the PACS: a VL Whole Slide Microscopy series read as one slide.

A slide scanner sends a slide as one series of VL Whole Slide Microscopy instances: the pyramid
levels (``VOLUME``), often a ``THUMBNAIL``, a ``LABEL`` and an ``OVERVIEW`` image. The pipeline
hands the model the series as one slide: a folder of links to its received instances, which the
slide reader (wsidicom) opens as one pyramid. The model's modality reads it (a slide model tiles
and embeds it), the Predictor answers for the slide, and the modality draws its explanation
(per-tile attention) as a map over the whole slide.

What goes back (see :mod:`meddx.dicom.results`): the slide-level SR referencing the slide's
instances, and the attention map blended on the smallest whole-slide picture of the series
(the lowest pyramid level or the thumbnail) as an RGB Secondary Capture in slide coordinates,
in the same study. The label and overview images are never drawn on: a label carries
identifiers.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread

from meddx.dicom.model import Algorithm, SeriesAnalysis
from meddx.dicom.routing import VL_WSM
from meddx.dicom.store import InstanceRow

__all__ = ["slide_folder", "map_instance", "analyse_slide", "MAX_MAP_PIXELS"]

logger = logging.getLogger(__name__)
#: the attention map is drawn on an instance whose whole pixel matrix is at most this big
MAX_MAP_PIXELS = 4096 * 4096
_PICTURES = ("VOLUME", "THUMBNAIL")  # ImageType value 3 of a whole-slide picture


def slide_folder(work: Path, series_uid: str, rows: list[InstanceRow]) -> Path:
    """A fresh folder under ``work/slides`` linking the series' received instances (the slide
    reader opens a folder as one slide); the files themselves stay where the listener put
    them."""
    digest = hashlib.sha256(series_uid.encode()).hexdigest()[:32]
    folder = work / "slides" / digest
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for r in rows:
        (folder / f"{hashlib.sha256(r.sop_uid.encode()).hexdigest()[:24]}.dcm").symlink_to(
            Path(r.path).resolve())
    return folder


def map_instance(rows: list[InstanceRow]) -> tuple[InstanceRow, tuple[int, int]] | None:
    """The smallest whole-slide picture of the series (pyramid level or thumbnail, never a
    label or overview) and its (rows, columns); None when none is small enough to draw on."""
    best: tuple[int, InstanceRow, tuple[int, int]] | None = None
    for r in rows:
        head = dcmread(r.path, stop_before_pixels=True)
        kind = [str(v).upper() for v in head.get("ImageType", [])]
        if len(kind) > 2 and kind[2] not in _PICTURES:
            continue
        shape = (int(head.get("TotalPixelMatrixRows", head.get("Rows", 0)) or 0),
                 int(head.get("TotalPixelMatrixColumns", head.get("Columns", 0)) or 0))
        size = shape[0] * shape[1]
        if 0 < size <= MAX_MAP_PIXELS and (best is None or size < best[0]):
            best = (size, r, shape)
    return None if best is None else (best[1], best[2])


def _attention(predictor: Any, sample: Any, explanation: Any, rows: list[InstanceRow]
               ) -> tuple[tuple[str, np.ndarray], ...]:
    """The explanation as a map on the smallest whole-slide picture, or nothing (said in the
    log) when the modality draws none or no picture is small enough."""
    if explanation is None:
        return ()
    target = map_instance(rows)
    if target is None:
        logger.warning("no slide level small enough to draw the attention map on")
        return ()
    row, shape = target
    grid = predictor.modality.explanation_map(sample, explanation, shape)
    if grid is None:
        return ()
    return ((row.sop_uid, np.clip(np.asarray(grid, np.float32), 0.0, 1.0)),)


def analyse_slide(predictor: Any, algorithm: Algorithm, work: Path, study_uid: str,
                  series_uid: str, rows: list[InstanceRow], *, explain: bool = True
                  ) -> SeriesAnalysis:
    """The slide model's answer on one whole-slide series.

    Args:
        predictor: the loaded slide model (:class:`meddx.inference.Predictor`).
        algorithm: its identification for the SR.
        work: the work folder (the slide's folder of links goes under ``work/slides``).
        study_uid, series_uid: the series.
        rows: its VL Whole Slide Microscopy instances.
        explain: attach the attention map.

    Raises:
        MeddxError: the slide cannot be read (DataError) or does not fit the model.
    """
    rows = [r for r in rows if r.sop_class == VL_WSM]
    folder = slide_folder(work, series_uid, rows)
    try:
        sample = predictor.read(folder)
        sample.id = series_uid
        sample.meta.pop("path", None)
        pred = predictor.predict_samples([sample], explain=explain)[0]
        heat = _attention(predictor, sample, pred.explanation, rows) if explain else ()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    meta = sample.meta
    how = (f"one slide of {len(rows)} VL Whole Slide Microscopy instances read as a pyramid; "
           f"the model pools its {meta.get('n_tiles', '?')} tissue tiles "
           f"({meta.get('tile_size', '?')} px at {meta.get('tile_mpp', '?')} um/px) into the "
           "slide answer")
    if heat:
        how += "; the attention map (tiles ranked by attention) is on the smallest level"
    pred.id = series_uid
    return SeriesAnalysis(study_uid=study_uid, series_uid=series_uid,
                          sources=tuple(Path(r.path) for r in rows), algorithm=algorithm,
                          prediction=pred, heatmaps=heat, aggregation=how, slide=True)
