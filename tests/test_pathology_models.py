"""ABMIL, tile encoders, the bag cache, the slide explainer and the pathology FHIR report
(no slide needed: bags are made from tiles drawn in the test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meddx.errors import DataError, InputMismatchError
from meddx.modalities.pathology.embeddings import (
    Bag,
    StatsEncoder,
    TileSettings,
    _save_bag,
    bag_key,
    embed_tiles,
    load_bag,
)
from meddx.modalities.pathology.networks import ABMIL, Bags, pad_bags


def _tiles(rng: np.random.Generator, n: int, tumour: bool, size: int = 32) -> np.ndarray:
    """Pink stroma-like tiles; 'tumour' tiles carry dense purple dots (nuclei)."""
    base = np.array([235, 180, 210], np.float32) + rng.normal(0, 6, (n, size, size, 3))
    if tumour:
        dots = rng.random((n, size, size)) < 0.25
        base[dots] = np.array([90, 40, 140], np.float32)
    return base.clip(0, 255).astype(np.uint8)


def test_abmil_attention_is_a_distribution_over_each_bags_tiles() -> None:
    torch.manual_seed(0)
    model = ABMIL(16, 1).eval()
    bags = pad_bags([torch.randn(5, 16), torch.randn(2, 16), torch.randn(9, 16)])
    logits, att = model.attend(bags)
    assert logits.shape == (3, 1) and att.shape == (3, 9)
    torch.testing.assert_close(att.sum(1), torch.ones(3))
    assert (att[~bags.mask] == 0).all()  # padding gets no weight
    # padding does not change a bag's answer
    alone = model(bags.features[1:2, :2].clone())
    torch.testing.assert_close(alone, logits[1:2], rtol=1e-5, atol=1e-5)


def test_abmil_refuses_wrong_width_and_empty_bags() -> None:
    model = ABMIL(16, 1)
    with pytest.raises(InputMismatchError, match="16"):
        model(torch.randn(1, 4, 8))
    with pytest.raises(InputMismatchError, match="without tiles"):
        pad_bags([torch.zeros(0, 16)])


@pytest.mark.slow
def test_abmil_learns_a_slide_label_carried_by_few_tiles() -> None:
    """A slide is positive when a few of its tiles are 'tumour': mean pooling of mostly
    normal tiles hides them, attention finds them (and points at them)."""
    rng = np.random.default_rng(0)
    enc = StatsEncoder()
    bags, labels, planted = [], [], []
    for i in range(40):
        pos = i % 2 == 1
        k = 3 if pos else 0
        tiles = np.concatenate([_tiles(rng, 12 - k, False), _tiles(rng, k, True)])
        bags.append(torch.from_numpy(enc(tiles)))
        labels.append(float(pos))
        planted.append(np.arange(12) >= 12 - k)
    feats = torch.cat(bags)
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
    x = pad_bags([(b - mean) / std for b in bags])
    y = torch.tensor(labels)[:, None]
    torch.manual_seed(0)
    model = ABMIL(enc.dim, 1, hidden=32, attention=16, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(25):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        opt.step()
    model.eval()
    logits, att = model.attend(x)
    acc = ((logits[:, 0] > 0).float() == y[:, 0]).float().mean().item()
    assert acc == 1.0
    # in positive slides, the planted tiles carry most of the attention
    pos = [i for i in range(40) if labels[i]]
    share = np.mean([att[i, :12][torch.from_numpy(planted[i])].sum().item() for i in pos])
    assert share > 0.6


def test_stats_encoder_separates_planted_textures_and_checks_input() -> None:
    rng = np.random.default_rng(1)
    enc = StatsEncoder()
    a, b = enc(_tiles(rng, 8, False)), enc(_tiles(rng, 8, True))
    assert a.shape == (8, enc.dim) and np.isfinite(a).all()
    gap = np.abs(a.mean(0) - b.mean(0)) / (a.std(0) + b.std(0) + 1e-6)
    assert gap.max() > 5
    with pytest.raises(DataError, match="uint8"):
        enc(np.zeros((2, 8, 8, 3), np.float32))


def test_embed_tiles_streams_batches_reports_progress_and_cancels() -> None:
    import threading

    rng = np.random.default_rng(2)
    enc = StatsEncoder()
    batches = [(np.array([[0, 0], [32, 0]]), _tiles(rng, 2, False)),
               (np.array([[0, 32]]), _tiles(rng, 1, True))]
    seen: list[int] = []
    xy, f = embed_tiles(iter(batches), enc, progress=seen.append)
    assert xy.tolist() == [[0, 0], [32, 0], [0, 32]] and f.shape == (3, enc.dim)
    assert seen == [2, 3]
    stop = threading.Event()
    stop.set()
    from meddx.modalities.pathology.embeddings import Cancelled

    with pytest.raises(Cancelled):
        embed_tiles(iter(batches), enc, cancel=stop)


def test_bag_cache_round_trip_is_safetensors_and_key_follows_its_inputs(tmp_path) -> None:
    enc = StatsEncoder()
    bag = Bag(features=torch.randn(4, enc.dim), coords=np.array([[0, 0], [64, 0], [0, 64],
                                                                 [64, 64]]),
              tissue=np.array([1, 0.9, 0.8, 0.7], np.float32), level0_size=64,
              slide_dimensions=(128, 128), slide_sha256="ab" * 32, mpp=0.5)
    path = tmp_path / "x.safetensors"
    _save_bag(bag, path, enc, TileSettings())
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    back = load_bag(path, slide="s.tiff")
    torch.testing.assert_close(back.features, bag.features)
    assert back.coords.tolist() == bag.coords.tolist() and back.level0_size == 64
    assert back.slide_dimensions == (128, 128) and back.slide == "s.tiff"
    k = bag_key("ab" * 32, enc, TileSettings(), None)
    assert k != bag_key("ab" * 32, enc, TileSettings(size=256), None)
    assert k != bag_key("cd" * 32, enc, TileSettings(), None)
    assert k != bag_key("ab" * 32, enc, TileSettings(), 0.25)
    path.write_bytes(b"garbage")
    with pytest.raises(DataError, match="delete it"):
        load_bag(path)


def test_modality_collate_caps_and_pads_bags() -> None:
    from meddx.modalities.pathology.modality import PathologyModality, cap_bag

    m = PathologyModality()
    spec = {"feature_mean": [0.0] * 3, "feature_std": [2.0] * 3, "max_tiles": 4}

    def bag(n: int) -> Bag:
        return Bag(features=torch.ones(n, 3) * 4, coords=np.zeros((n, 2), np.int64),
                   tissue=np.ones(n, np.float32), level0_size=8, slide_dimensions=(8, 8),
                   slide_sha256="0" * 64)

    items = [(m.item_tensor(bag(n), spec), np.int64(i % 2)) for i, n in enumerate((2, 10))]
    x, y = m.collate(items)
    assert isinstance(x, Bags) and x.features.shape == (2, 4, 3)
    assert x.sizes.tolist() == [2, 4] and y.tolist() == [0, 1]
    assert float(x.features[0, 0, 0]) == 2.0  # standardised with the train statistics
    rng = np.random.default_rng(0)
    assert len(cap_bag(bag(10), 3, rng)) == 3


def test_heatmap_draws_tiles_on_the_thumbnail_grid() -> None:
    from meddx.modalities.pathology.explain import heatmap_image, rank01

    bag = Bag(features=torch.zeros(2, 3), coords=np.array([[0, 0], [512, 0]]),
              tissue=np.ones(2, np.float32), level0_size=512, slide_dimensions=(1024, 512),
              slide_sha256="0" * 64)
    thumb = np.full((64, 128, 3), 200, np.uint8)
    img = heatmap_image(bag, rank01(np.array([0.1, 0.9])), thumb)
    assert img.shape == thumb.shape
    assert not np.array_equal(img[:, :64], img[:, 64:])  # two different colours
    assert rank01(np.array([3.0, 1.0, 2.0])).tolist() == [1.0, 0.0, 0.5]


def test_slide_report_validates_with_r4b_and_carries_the_heat_map() -> None:
    import base64

    from fhir.resources.R4B.bundle import Bundle

    from meddx.inference.prediction import Prediction
    from meddx.modalities.pathology.fhir import slide_report_bundle
    from meddx.package import ModelCard
    from meddx.tasks import TaskSpec

    card = ModelCard(name="slides", modality="pathology",
                     task=TaskSpec(kind="binary", class_names=["normal", "tumour"],
                                   positive_class="tumour"),
                     network={"name": "abmil"}, preprocessing={"format": "wsi-bag"},
                     research_only=True)
    pred = Prediction(id="job", probabilities={"normal": 0.3, "tumour": 0.7}, label="tumour",
                      model={"name": "slides", "version": "1", "sha256": "a" * 64,
                             "positive_class": "tumour"})
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
    b = slide_report_bundle(pred, card, heatmap_png=png, n_tiles=42)
    Bundle.model_validate(b)
    report = b["entry"][0]["resource"]
    assert report["resourceType"] == "DiagnosticReport"
    assert report["category"][0]["coding"][0]["code"] == "LP7839-6"
    assert "42 tissue tiles" in report["conclusion"]
    media = next(e["resource"] for e in b["entry"] if e["resource"]["resourceType"] == "Media")
    assert base64.b64decode(media["content"]["data"]) == png
    assert "heat map" in media["content"]["title"]
