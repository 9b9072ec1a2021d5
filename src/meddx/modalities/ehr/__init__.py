"""EHR records: ICU stays (PhysioNet 2012, FHIR R4B Bundles, CDS Hooks prefetch) and tabular
clinical data.

What this folder registers (strings: nothing is imported until it is used). See
:mod:`meddx.modalities` for how these are read.
"""

MODALITIES = {
    "ehr": "meddx.modalities.ehr.modality:EHRModality",
    "tabular": "meddx.modalities.ehr.tabular:TabularModality",
}
NETWORKS = {
    "grud": "meddx.modalities.ehr.networks:grud",
    "ehr_transformer": "meddx.modalities.ehr.networks:ehr_transformer",
    "logistic": "meddx.modalities.ehr.networks:logistic",
    "mlp": "meddx.modalities.ehr.networks:mlp",
}
CDS_ADAPTERS = {"ehr": "meddx.modalities.ehr.cds:EhrCdsAdapter"}
COMMANDS = "meddx.modalities.ehr.cli:register"
