"""DICOM for meddx: results as DICOM objects, delivery to a PACS, worklist priority.

Modules (imported on first use, so ``import meddx.dicom`` stays light):

- :mod:`meddx.dicom.model` — the shared types (:class:`Algorithm`, :class:`SeriesAnalysis`);
- :mod:`meddx.dicom.results` — Structured Report and heat-map Secondary Capture writers
  (highdicom);
- :mod:`meddx.dicom.send` — :class:`Destination` and the persistent :class:`Outbox`
  (C-STORE SCU via pynetdicom, STOW-RS via dicomweb-client, retries with back-off);
- :mod:`meddx.dicom.worklist` — study risk and priority, JSON and FHIR R4B ``Task``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = [
    "Algorithm", "SeriesAnalysis",
    "structured_report", "heatmap_images", "result_datasets",
    "Destination", "Outbox", "DeliveryReport",
    "WorklistEntry", "rank", "to_fhir", "worklist_json",
]

_WHERE = {
    "Algorithm": "model", "SeriesAnalysis": "model",
    "structured_report": "results", "heatmap_images": "results", "result_datasets": "results",
    "Destination": "send", "Outbox": "send", "DeliveryReport": "send",
    "WorklistEntry": "worklist", "rank": "worklist", "to_fhir": "worklist",
    "worklist_json": "worklist",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"meddx.dicom.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'meddx.dicom' has no attribute {name!r}")
