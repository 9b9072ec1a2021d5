"""FHIR R4B in and out (built and validated with ``fhir.resources.R4B``) and the CDS Hooks
adapter contract. A core layer: it imports nothing of meddx but the error tree, so modality
folders and the service both build on it."""
