"""Medical images in 2D and 3D: X-ray, CT, ultrasound, fundus, OCT, dermoscopy (MedMNIST,
ISIC 2017, PNG/JPEG/DICOM/NIfTI folders).

What this folder registers (strings: nothing is imported until it is used). See
:mod:`meddx.modalities` for how these are read.
"""

MODALITIES = {
    "image": "meddx.modalities.image.modality:ImageModality",
}
NETWORKS = {
    "resnet18": "meddx.modalities.image.networks:resnet18",
    "resnet34": "meddx.modalities.image.networks:resnet34",
    "resnet50": "meddx.modalities.image.networks:resnet50",
    "densenet121": "meddx.modalities.image.networks:densenet121",
    "efficientnet_b0": "meddx.modalities.image.networks:efficientnet_b0",
}
CDS_ADAPTERS = {"image": "meddx.modalities.image.cds:ImageCdsAdapter"}
COMMANDS = None
