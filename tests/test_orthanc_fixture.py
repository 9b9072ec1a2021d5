"""The Orthanc fixture is a real PACS: it answers C-ECHO on its DICOM port and QIDO-RS over
DICOMweb, and stores what it is sent."""

from __future__ import annotations

import httpx
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from conftest import require_data


def test_orthanc_answers_c_echo(orthanc):
    ae = AE(ae_title="MEDDX")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.ae_title)
    assert assoc.is_established
    status = assoc.send_c_echo()
    assoc.release()
    assert status.Status == 0x0000


def test_orthanc_answers_qido_rs(orthanc):
    ct = require_data("dicom/CT_small.dcm")
    orthanc.upload(ct)
    r = httpx.get(f"{orthanc.dicomweb_url}/studies", headers={"Accept": "application/dicom+json"},
                  timeout=10)
    assert r.status_code == 200
    studies = {s["0020000D"]["Value"][0] for s in r.json()}
    import pydicom

    assert pydicom.dcmread(ct).StudyInstanceUID in studies
    assert orthanc.rest("/system")["DicomAet"] == "ORTHANC"
    assert "meddx" in orthanc.rest("/modalities")
