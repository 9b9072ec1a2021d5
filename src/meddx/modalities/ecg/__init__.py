"""ECG waveforms: WFDB, PhysioNet 2017, CSV and FHIR SampledData; rhythm classification.

What this folder registers (strings: nothing is imported until it is used). See
:mod:`meddx.modalities` for how these are read.
"""

MODALITIES = {
    "ecg": "meddx.modalities.ecg.modality:ECGModality",
}
NETWORKS = {
    "resnet1d": "meddx.modalities.ecg.networks:resnet1d",
    "cnn_gru": "meddx.modalities.ecg.networks:cnn_gru",
}
CDS_ADAPTERS = {"ecg": "meddx.modalities.ecg.cds:EcgCdsAdapter"}
COMMANDS = None
