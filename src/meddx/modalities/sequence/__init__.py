"""DNA sequences: FASTA/CSV to one-hot, CNN models, in-silico mutagenesis and variant effects.

What this folder registers (strings: nothing is imported until it is used). See
:mod:`meddx.modalities` for how these are read.
"""

MODALITIES = {
    "sequence": "meddx.modalities.sequence.modality:SequenceModality",
}
NETWORKS = {
    "seq_cnn": "meddx.modalities.sequence.networks:seq_cnn",
    "seq_cnn_gru": "meddx.modalities.sequence.networks:seq_cnn_gru",
}
CDS_ADAPTERS = {}
COMMANDS = None
