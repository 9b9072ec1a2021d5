"""Synthetic slides with planted labels for the pathology model tests.

A slide is white background around a pink tissue disc; a *tumour* slide also holds patches of
dense purple dots (nuclei-like texture) inside the tissue. Slides are written as tiled
pyramidal TIFFs with tifffile (level 0 plus 2× downsampled levels, resolution tags giving the
µm per pixel unless ``mpp=None``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def slide_pixels(size: tuple[int, int], tumour: bool, seed: int, patches: int = 3,
                 patch: int = 96) -> np.ndarray:
    """``(h, w, 3)`` uint8: tissue disc on white, with ``patches`` tumour squares if asked."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    inside = ((xx - w / 2) / (0.42 * w)) ** 2 + ((yy - h / 2) / (0.42 * h)) ** 2 < 1
    img = np.full((h, w, 3), 245, np.float32)
    tissue = np.array([228, 170, 205], np.float32) + rng.normal(0, 8, (h, w, 3))
    img[inside] = tissue[inside]
    if tumour:
        for _ in range(patches):
            x0 = int(rng.integers(int(0.3 * w), int(0.7 * w) - patch))
            y0 = int(rng.integers(int(0.3 * h), int(0.7 * h) - patch))
            dots = rng.random((patch, patch)) < 0.3
            region = img[y0:y0 + patch, x0:x0 + patch]
            region[dots] = np.array([80, 35, 130], np.float32)
    return img.clip(0, 255).astype(np.uint8)


def write_slide(path: Path, rgb: np.ndarray, mpp: float | None = 0.5, levels: int = 3,
                tile: int = 128) -> Path:
    """Write ``rgb`` as a tiled pyramidal TIFF (SubIFDs for the lower levels)."""
    import tifffile

    opts: dict = {"tile": (tile, tile), "photometric": "rgb", "compression": "zlib"}
    if mpp is not None:
        opts.update(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, subifds=levels - 1, **opts)
        for k in range(1, levels):
            f = 2 ** k
            tif.write(rgb[::f, ::f], subfiletype=1, **{**opts, **(
                {"resolution": (1e4 / (mpp * f), 1e4 / (mpp * f))} if mpp else {})})
    return path


def slide_set(folder: Path, n: int, size: tuple[int, int] = (512, 512),
              splits: list[str] | None = None, seed: int = 0) -> Path:
    """``n`` slides (alternating normal/tumour) and ``slides.csv`` (slide,label[,split])."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["slide,label" + (",split" if splits else "")]
    for i in range(n):
        tumour = i % 2 == 1
        name = f"s{i:02d}.tiff"
        write_slide(folder / name, slide_pixels(size, tumour, seed + i))
        label = "tumour" if tumour else "normal"
        rows.append(f"{name},{label}" + (f",{splits[i]}" if splits else ""))
    csv = folder / "slides.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def untrained_tile_encoder(folder: Path, *, size: int = 32):
    """A real, untrained, seeded tile classifier (a ResNet-18 of an eighth of the usual width
    on ``size``-px RGB tiles, 64 penultimate features) saved as ``folder/model``: a package tile
    encoder for the tests of slide packages that carry theirs."""
    import torch

    from meddx.modalities import get_modality
    from meddx.models import build_network
    from meddx.package import ModelCard, save_package
    from meddx.tasks import TaskSpec

    spec = {"spatial_dims": 2, "channels": 3, "size": size, "normalize": "dtype-range"}
    options = {"widen_factor": 0.125}
    task = TaskSpec(kind="binary", class_names=["normal", "tumour"], positive_class="tumour")
    torch.manual_seed(0)
    net = build_network("resnet18", num_outputs=task.num_outputs,
                        spec=get_modality("image").network_spec(spec), options=options)
    card = ModelCard(name="tiles", modality="image", task=task,
                     network={"name": "resnet18", "options": options}, preprocessing=spec)
    return save_package(folder / "model", net.eval(), card)


def untrained_slide_package(folder: Path, *, name: str = "slides", mpp: float = 1.0,
                            max_tiles: int = 256, encoder: Path | None = None):
    """A real, untrained, seeded ABMIL slide package over the 'stats' tile encoder (or over the
    tile-classifier package at ``encoder``), saved as ``folder/model``: for tests of the
    mechanics (jobs, replicas, cohorts, the PACS path, packaging), not of what the weights
    learned."""
    import torch

    from meddx.modalities.pathology.embeddings import PackageEncoder, StatsEncoder
    from meddx.modalities.pathology.networks import ABMIL
    from meddx.package import ModelCard, save_package
    from meddx.tasks import TaskSpec

    enc = StatsEncoder() if encoder is None else PackageEncoder(encoder)
    dim = enc.dim
    torch.manual_seed(0)
    spec = {"format": "wsi-bag", "spatial_dims": 0, "channels": dim,
            "encoder": enc.describe(),
            "tiles": {"mpp": mpp, "size": 32, "min_tissue": 0.3, "stain": None},
            "max_tiles": max_tiles, "slide_mpp": None,
            "feature_mean": [0.0] * dim, "feature_std": [1.0] * dim}
    card = ModelCard(name=name, modality="pathology",
                     task=TaskSpec(kind="binary", class_names=["normal", "tumour"],
                                   positive_class="tumour"),
                     network={"name": "abmil", "options": {}}, preprocessing=spec,
                     research_only=True)
    return save_package(folder / "model", ABMIL(dim, 1), card)
