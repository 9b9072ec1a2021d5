"""Privacy: DICOM de-identification (PS3.15 Table E.1-1 basic profile, allow-list for text)."""

from meddx.privacy.deid import DeidReport, deidentify
from meddx.privacy.files import (
    DeidSummary,
    FileOutcome,
    deidentify_file,
    deidentify_folder,
    deidentify_one,
)

__all__ = ["DeidReport", "DeidSummary", "FileOutcome", "deidentify", "deidentify_file",
           "deidentify_folder", "deidentify_one"]
