"""Whole-slide pathology: slide reading (OpenSlide, TiffSlide, wsidicom), tissue detection,
streaming tiling, stain normalisation, slide-level models and heat maps.

What this folder registers (strings: nothing is imported until it is used). See
:mod:`meddx.modalities` for how these are read.
"""

MODALITIES = {"pathology": "meddx.modalities.pathology.modality:PathologyModality"}
NETWORKS = {"abmil": "meddx.modalities.pathology.networks:abmil"}
CDS_ADAPTERS = {}
COMMANDS = "meddx.modalities.pathology.cli:register"  # register(app) adds `meddx wsi ...`
