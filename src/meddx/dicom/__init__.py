"""DICOM networking and results (issue 21)."""
