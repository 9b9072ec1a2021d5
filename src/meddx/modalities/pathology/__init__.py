"""Pathology: whole-slide images (Aperio, generic TIFF, Hamamatsu, MIRAX, DICOM WSI), tissue
detection and tiling, tile classifiers and slide-level attention MIL (ABMIL), heat maps.

What this folder registers (strings: nothing is imported until it is used). See
:mod:`meddx.modalities` for how these are read.
"""

MODALITIES = {
    "pathology": "meddx.modalities.pathology.modality:PathologyModality",
}
NETWORKS = {
    "abmil": "meddx.modalities.pathology.networks:abmil",
}
CDS_ADAPTERS = {}
COMMANDS = "meddx.modalities.pathology.cli:register"
