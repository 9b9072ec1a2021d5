"""In-silico mutagenesis on a task whose answer is known, variant effect through a real package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from meddx.errors import DataError, InputMismatchError
from meddx.inference import load_model
from meddx.modalities import get_modality
from meddx.modalities.sequence.modality import variant_effect
from meddx.models import build_network
from meddx.package import ModelCard, save_package
from meddx.tasks import TaskSpec

LENGTH, MOTIF, START = 40, "TATAAT", 15  # motif at 1-based positions 15..20 in positives
TASK = TaskSpec(kind="binary", class_names=["absent", "present"], positive_class="present")
SPEC = {"format": "dna-onehot", "alphabet": "ACGT", "iupac": "fractional", "channels": 4,
        "length": LENGTH, "spatial_dims": 1, "size": LENGTH, "reverse_complement": False,
        "task_kind": "binary", "positive_index": 1}
OPTIONS = {"filters": [16, 16], "kernels": [5, 3], "pools": [2, 1], "hidden": 16,
           "dropout": 0.0}


def _synthetic(n: int, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    seqs, labels = [], rng.integers(0, 2, n)
    for y in labels:
        s = list(rng.choice(list("ACGT"), LENGTH))
        if y:
            s[START - 1 : START - 1 + len(MOTIF)] = MOTIF
        seqs.append("".join(s))
    return seqs, labels


@pytest.fixture(scope="module")
def motif_model() -> torch.nn.Module:
    """A small seq_cnn trained (hand-written loop) to detect the planted motif."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: extra threads only contend on a busy machine
    try:
        return _train_motif_model()
    finally:
        torch.set_num_threads(threads)


def _train_motif_model() -> torch.nn.Module:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    seqs, labels = _synthetic(512, rng)
    mod = get_modality("sequence")
    x = torch.stack([mod.item_tensor(s, SPEC) for s in seqs])
    y = torch.as_tensor(labels)
    net = build_network("seq_cnn", num_outputs=1, spec=mod.network_spec(SPEC), options=OPTIONS)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(8):
        for i in range(0, len(x), 64):
            loss = TASK.loss(net(x[i : i + 64]), y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    test, ty = _synthetic(200, rng)
    with torch.no_grad():
        p = torch.sigmoid(net(torch.stack([mod.item_tensor(s, SPEC) for s in test])))[:, 0]
    assert ((p.numpy() > 0.5) == ty).mean() > 0.95, "the synthetic task was not learned"
    return net


def test_ism_finds_the_planted_motif(motif_model: torch.nn.Module, tmp_path: Path) -> None:
    rng = np.random.default_rng(42)
    seqs, labels = _synthetic(20, rng)
    seq = next(s for s, y in zip(seqs, labels, strict=True) if y)
    mod = get_modality("sequence")
    sample = mod.read(seq, SPEC)
    explainer = mod.explainer(motif_model, SPEC)
    delta = explainer.explain(sample, TASK.positive_index)
    assert delta.shape == (4, LENGTH)
    motif_positions = set(range(START, START + len(MOTIF)))
    assert set(explainer.last.top_positions(len(MOTIF))) == motif_positions
    # mutating the motif lowers P(present): its contributions are positive
    assert (explainer.last.contribution[START - 1 : START - 1 + len(MOTIF)] > 0).all()
    png = explainer.plot(sample, delta, tmp_path / "ism.png", class_name="present")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert explainer.explain(sample.tensor, None).shape == (4, LENGTH)  # bare tensor, top class


def test_variant_effect_through_a_package(motif_model: torch.nn.Module, tmp_path: Path) -> None:
    card = ModelCard(name="motif", modality="sequence", task=TASK,
                     network={"name": "seq_cnn", "options": OPTIONS}, preprocessing=SPEC)
    save_package(tmp_path / "model", motif_model, card)
    predictor = load_model(tmp_path / "model")
    seqs, labels = _synthetic(20, np.random.default_rng(7))
    seq = next(s for s, y in zip(seqs, labels, strict=True) if y)
    other = next(b for b in "ACG" if b != seq[1])
    fa = tmp_path / "seq.fa"
    fa.write_text(f">site\n{seq[:20]}\n{seq[20:]}\n")
    out = variant_effect(predictor, f"{fa}:{START}:T>G")
    assert out["sequence_id"] == "site" and out["position"] == START
    assert out["reference"]["present"] > 0.5
    assert out["delta"]["present"] < -0.02  # breaking the motif weakens the signal
    assert out["delta"]["present"] == pytest.approx(
        out["alternate"]["present"] - out["reference"]["present"], abs=1e-5)
    silent = variant_effect(predictor, f"{fa}:2:{seq[1]}>{other}")  # outside the motif
    assert abs(silent["delta"]["present"]) < 0.2 * abs(out["delta"]["present"])
    with pytest.raises(DataError, match="reference allele at position 15 of 'site' is T, not C"):
        variant_effect(predictor, f"{fa}:{START}:C>G")
    with pytest.raises(DataError, match="outside sequence"):
        variant_effect(predictor, f"{fa}:41:A>G")
    with pytest.raises(DataError, match="not found"):
        variant_effect(predictor, f"{tmp_path / 'nope.fa'}:3:A>G")
    with pytest.raises(InputMismatchError, match="changes the length"):
        variant_effect(predictor, f"{fa}:{START}:T>TA")
    with pytest.raises(InputMismatchError, match="model takes exactly 40"):
        predictor.predict(["ACGT"])


def test_sequence_prediction_as_fhir_observation(motif_model: torch.nn.Module,
                                                 tmp_path: Path) -> None:
    card = ModelCard(name="motif", modality="sequence", task=TASK,
                     network={"name": "seq_cnn", "options": OPTIONS}, preprocessing=SPEC)
    predictor = load_model(save_package(tmp_path / "model", motif_model, card).path)
    pred = predictor.predict([{"sequence": "ACGT" * 10, "id": "win-1"}])[0]
    obs = predictor.modality.to_fhir(pred, predictor.card)
    assert obs["resourceType"] == "Observation" and obs["status"] == "final"
    assert obs["valueCodeableConcept"]["text"] == pred.label
    probs = {c["code"]["text"]: c["valueQuantity"]["value"] for c in obs["component"]}
    assert probs["probability of present"] == pytest.approx(pred.probabilities["present"],
                                                            abs=1e-6)
    assert "win-1" in obs["note"][0]["text"]
