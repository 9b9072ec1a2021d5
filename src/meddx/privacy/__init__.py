"""Privacy: DICOM de-identification (allow-list, PS3.15 Annex E basis)."""

from meddx.privacy.deid import DeidReport, deidentify, deidentify_file, deidentify_folder

__all__ = ["DeidReport", "deidentify", "deidentify_file", "deidentify_folder"]
