"""Explanations from the service for sequences, molecules and ECGs: REST ``?explain=true``
answers with the modality's plot (PNG) and a numeric summary; an ECG CDS card links to the
signed page with the trace and its attribution strip."""

from __future__ import annotations

import base64
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import synthetic_ecg_observation
from meddx.serving.app import create_app
from meddx.serving.auth import new_api_key
from meddx.serving.cds import validate_response
from meddx.serving.settings import ServeSettings
from serving_support import PUBLIC, Keys, cds_settings, token

PNG = b"\x89PNG\r\n\x1a\n"
SEQUENCE = "ACGTTATAATGCGCATTACGGATC"  # 24 bases, the tiny package's length


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def api_key() -> tuple[str, str]:
    return new_api_key("tester")


@pytest.fixture(scope="module")
def settings(keys, api_key, tmp_path_factory) -> ServeSettings:
    tmp = tmp_path_factory.mktemp("explain")
    return cds_settings(keys, tmp, api_keys={"tester": api_key[1]}, heatmap_dir=tmp / "results")


@pytest.fixture(scope="module")
def client(tiny_sequence_package, tiny_molecule_package, tiny_ecg_package, settings):
    packages = [tiny_sequence_package.path, tiny_molecule_package.path, tiny_ecg_package.path]
    with TestClient(create_app(packages, settings)) as c:
        yield c


@pytest.fixture(scope="module")
def auth(api_key) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key[0]}"}


def explained(client, auth, name: str, item) -> dict:
    r = client.post(f"/v1/models/{name}/predict?explain=true", headers=auth,
                    json={"inputs": [item]})
    assert r.status_code == 200, r.text
    [p] = r.json()["predictions"]
    assert "heatmap_png" not in p  # the image field keeps its meaning
    png = base64.b64decode(p["explanation_png"])
    assert png.startswith(PNG)
    im = Image.open(io.BytesIO(png))
    assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0
    return p


def test_sequence_explanation_is_an_ism_plot_with_top_positions(client, auth,
                                                                tiny_sequence_package):
    p = explained(client, auth, "splice-tiny", SEQUENCE)
    assert p["explained_class"] == "present"
    s = p["explanation"]
    assert s["method"] == "in_silico_mutagenesis" and len(s["top_positions"]) == 5
    for t in s["top_positions"]:
        assert 1 <= t["position"] <= len(SEQUENCE) and t["base"] == SEQUENCE[t["position"] - 1]
    importances = [t["importance"] for t in s["top_positions"]]
    assert importances == sorted(importances, reverse=True)
    plain = client.post("/v1/models/splice-tiny/predict", headers=auth,
                        json={"inputs": [SEQUENCE]}).json()["predictions"][0]
    assert "explanation_png" not in plain and "explanation" not in plain


def test_molecule_explanation_draws_atoms_and_names_the_top_ones(client, auth):
    p = explained(client, auth, "tox-tiny", "CC(=O)Nc1ccc(O)cc1")  # paracetamol, 11 atoms
    s = p["explanation"]
    assert s["method"] == "atom_masking"
    assert len(s["top_atoms"]) == 5 and all(0 <= t["index"] < 11 for t in s["top_atoms"])
    symbols = dict(enumerate("CCONCCCCOCC"))
    assert all(t["symbol"] == symbols[t["index"]] for t in s["top_atoms"])
    sizes = [abs(t["contribution"]) for t in s["top_atoms"]]
    assert sizes == sorted(sizes, reverse=True)


def test_ecg_explanation_is_the_trace_with_the_most_important_span(client, auth):
    p = explained(client, auth, "af-untrained", synthetic_ecg_observation(seconds=12.0))
    s = p["explanation"]
    assert s["method"] == "integrated_gradients"
    assert 0.0 <= s["start_s"] <= s["peak_s"] <= s["end_s"] <= 12.0 + 1e-6
    assert s["end_s"] > s["start_s"]


def test_ecg_card_links_to_the_trace_with_its_attribution(client, keys, settings):
    obs = {**synthetic_ecg_observation(seconds=12.0, subject="Patient/p-ecg-77"),
           "id": "ecg-1", "effectiveDateTime": "2024-05-01T10:00:00Z"}
    body = {"hook": "patient-view", "hookInstance": "5b0e5a52-8f0d-4a53-a4f7-0d3b8e5c1a12",
            "context": {"userId": "Practitioner/1", "patientId": "p-ecg-77"},
            "prefetch": {"ecg": {"resourceType": "Bundle", "type": "searchset",
                                 "entry": [{"resource": obs}]}}}
    tok = token(keys.ec, f"{PUBLIC}/cds-services/af-untrained")
    r = client.post("/cds-services/af-untrained", json=body,
                    headers={"Authorization": f"Bearer {tok}"})
    assert r.status_code == 200, r.text
    validate_response(r.json())
    [card] = r.json()["cards"]
    [link] = card["links"]
    assert link["label"] == "Open the ECG trace with its attribution strip"
    assert link["type"] == "absolute" and link["url"].startswith(f"{PUBLIC}/ui/result/")
    url = link["url"].replace(PUBLIC, "")
    page = client.get(url)  # no token: the signed link is the credential
    assert page.status_code == 200 and 'id="explanation"' in page.text
    assert "Most important stretch:" in page.text
    assert "p-ecg-77" not in page.text and "ecg-1" not in page.text
    stored = (settings.heatmap_dir / url.split("?")[0].rsplit("/", 1)[1] / "meta.json")
    assert "p-ecg-77" not in stored.read_text()
    path, query = url.split("?")
    img = client.get(f"{path}/explanation.png?{query}")
    assert img.status_code == 200 and img.content.startswith(PNG)
    assert Image.open(io.BytesIO(img.content)).size[1] > 0
    assert client.get(f"{path}/explanation.png?{query[:-1]}x").status_code == 404
