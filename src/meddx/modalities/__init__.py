"""Modalities: one module each; adding one touches its own file and one line here."""

from __future__ import annotations

from meddx.modalities.base import DataBundle, Modality, Sample, Split
from meddx.registry import Registry

__all__ = ["MODALITIES", "get_modality", "DataBundle", "Modality", "Sample", "Split"]

MODALITIES: Registry[type[Modality]] = Registry("modality")
MODALITIES.register("image", "meddx.modalities.image:ImageModality")
MODALITIES.register("ecg", "meddx.modalities.ecg:ECGModality")
MODALITIES.register("sequence", "meddx.modalities.sequence:SequenceModality")
MODALITIES.register("molecule", "meddx.modalities.molecule:MoleculeModality")
MODALITIES.register("ehr", "meddx.modalities.ehr:EHRModality")
MODALITIES.register("tabular", "meddx.modalities.ehr:TabularModality")


def get_modality(name: str) -> Modality:
    """An instance of the modality registered as ``name``."""
    return MODALITIES.get(name)()
