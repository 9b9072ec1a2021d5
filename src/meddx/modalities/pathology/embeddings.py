"""Tile encoders and the on-disk cache of slide embeddings.

A slide becomes a *bag*: the embeddings of its tissue tiles ``(N, D)`` with each tile's level-0
top-left corner. Computing a bag reads the whole slide once; the result is cached as
``cache_dir()/pathology/<key>.safetensors`` (tensors ``features``, ``coords``, ``tissue`` and a
string header; never a pickle), where ``key`` is the sha256 of the slide file's sha256, the
encoder's identity and the tiling (tile µm/px, size, minimum tissue, stain normalisation). An
epoch over hundreds of slides then reads a few MB per slide and never opens a slide.

Encoders (``data.options.encoder``):

* ``stats`` (default, no download, no training): 58 colour and texture statistics per tile:
  per channel of RGB, grey and the Ruifrok–Johnston haematoxylin/eosin/DAB optical densities
  the mean, standard deviation and 10/50/90th percentiles; 8-bin histograms of the H and E
  densities; mean and spread of the grey-level gradient at 1, 2 and 4 px; the share of
  strongly haematoxylin-stained (nuclear) pixels. Chosen because it needs nothing downloaded
  or trained, costs less than a small CNN's forward pass on a CPU (figures in
  ``docs/pathology.md``), and carries what separates H&E
  tissue classes at low resolution (nuclear density, stain balance, texture scale). What it
  is worth against a trained tile encoder is measured in ``benchmarks/wsi_models.py``.
* a path to an image :class:`~meddx.package.ModelPackage` (a trained tile classifier): the
  input of its last linear layer (the penultimate features, 512 for ``resnet18``). A slide
  package carries a copy of it (:mod:`~meddx.modalities.pathology.bundle`); its identity, the
  sha256 of its weights, keeps the cache key wherever the copy lies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddx.errors import ConfigError, DataError, MeddxError, ModelError

__all__ = ["Bag", "Cancelled", "Encoder", "PackageEncoder", "StatsEncoder", "TileSettings",
           "bag_key", "embed_slide", "embed_tiles", "load_bag", "make_encoder",
           "slide_sha256"]

logger = logging.getLogger(__name__)

CACHE_VERSION = "1"

# Ruifrok & Johnston (2001) stain vectors, as scikit-image's rgb_from_hed
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]],
                         dtype=np.float32)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED).astype(np.float32)
_OD_LUT = (-np.log((np.arange(256, dtype=np.float32) + 1.0) / 256.0)).astype(np.float32)
_RGB_LUT = (np.arange(256, dtype=np.float32) / 255.0).astype(np.float32)
_GREY = np.array([0.299, 0.587, 0.114], np.float32)


class Cancelled(MeddxError):
    """Embedding stopped because its job was cancelled."""

    status_code = 409


@dataclass(frozen=True)
class TileSettings:
    """How a slide is cut into tiles (part of the cache key and of the model's preprocessing).

    Args:
        mpp: tile resolution in µm per pixel (0.5 ≈ 20×).
        size: tile side in pixels at that resolution.
        min_tissue: least tissue fraction of a kept tile.
        stain: Macenko stain normalisation parameters (``stain_matrix``, ``max_conc``) or None.
    """

    mpp: float = 0.5
    size: int = 224
    min_tissue: float = 0.5
    stain: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        return {"mpp": float(self.mpp), "size": int(self.size),
                "min_tissue": float(self.min_tissue), "stain": self.stain}


# ------------------------------------------------------------------------------ encoders
class Encoder:
    """Turns tiles ``(B, H, W, 3)`` uint8 RGB into embeddings ``(B, D)`` float32."""

    identity: str
    dim: int

    def __call__(self, tiles: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"kind": "stats", "dim": self.dim}


def _pool(x: np.ndarray, k: int) -> np.ndarray:
    b, h, w = x.shape
    h2, w2 = h // k, w // k
    return x[:, : h2 * k, : w2 * k].reshape(b, h2, k, w2, k).mean(axis=(2, 4))


def _gradient_stats(grey: np.ndarray) -> list[np.ndarray]:
    out = []
    for k in (1, 2, 4):
        g = grey if k == 1 else _pool(grey, k)
        dx = np.abs(np.diff(g, axis=2)).reshape(len(g), -1)
        dy = np.abs(np.diff(g, axis=1)).reshape(len(g), -1)
        mag = np.concatenate([dx, dy], axis=1)
        out += [mag.mean(1), mag.std(1)]
    return out


class StatsEncoder(Encoder):
    """Colour and texture statistics per tile (see the module docstring); ``D = 58``."""

    identity = "stats-v1"

    def __init__(self) -> None:
        self.dim = len(self(np.zeros((1, 8, 8, 3), np.uint8))[0])

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        t = np.asarray(tiles)
        if t.ndim != 4 or t.shape[-1] != 3 or t.dtype != np.uint8:
            raise DataError(f"tiles must be (B, H, W, 3) uint8 RGB, got {t.dtype} {t.shape}")
        b = len(t)
        # colour statistics on every other pixel (a quarter of the work, the same figures to
        # within sampling noise); texture on the full grid
        sub = t[:, ::2, ::2]
        rgb = _RGB_LUT[sub]
        hed = np.maximum(_OD_LUT[sub] @ _HED_FROM_RGB, 0)
        grey_sub = rgb @ _GREY
        chans = np.concatenate([rgb, hed, grey_sub[..., None]], axis=-1).reshape(b, -1, 7)
        feats = [chans.mean(1), chans.std(1)]
        feats += list(np.percentile(chans[:, ::4], [10, 50, 90], axis=1))
        for j, top in ((0, 0.6), (1, 0.4)):  # H and E optical densities
            v = np.clip(hed[..., j].reshape(b, -1), 0, top - 1e-6)
            idx = (v / top * 8).astype(np.int64) + 8 * np.arange(b)[:, None]
            feats.append(np.bincount(idx.ravel(), minlength=8 * b).reshape(b, 8) / v.shape[1])
        feats += [f[:, None] for f in _gradient_stats(_RGB_LUT[t] @ _GREY)]
        feats.append((hed[..., 0].reshape(b, -1) > 0.25).mean(1)[:, None])
        return np.concatenate(feats, axis=1).astype(np.float32)


class PackageEncoder(Encoder):
    """The penultimate features of a trained image package (a tile classifier).

    Args:
        path: the package folder.
        sha256: when given, the weights must have this digest (a model trained on one encoder
            must not silently get another).
    """

    def __init__(self, path: str | Path, sha256: str | None = None) -> None:
        card, weights_sha256, model = _read_package(Path(path))
        spec = card.get("preprocessing", {})
        if card.get("modality") != "image" or spec.get("spatial_dims") != 2 \
                or spec.get("channels") != 3:
            raise ConfigError(f"encoder package '{card.get('name')}' is not a 2D RGB image model",
                              path=str(path), hint="train a tile classifier on RGB patches")
        if spec.get("normalize", "dtype-range") != "dtype-range":
            raise ConfigError("an encoder package must scale tiles to 0..1 (normalize: "
                              f"dtype-range), this one uses {spec.get('normalize')!r}",
                              path=str(path))
        if sha256 and weights_sha256 != sha256:
            raise ConfigError("the tile encoder package differs from the one this model was "
                              "trained with (sha256 mismatch)", path=str(path),
                              hint="give the encoder package the model was trained with; a "
                              "slide package made now carries it (`meddx wsi embed-encoder`)")
        self.path, self.sha256 = str(Path(path).resolve()), weights_sha256
        self.size = int(spec["size"])
        self.model = model
        linears = [m for m in self.model.modules() if isinstance(m, torch.nn.Linear)]
        if not linears:
            raise ConfigError("the encoder package's network has no linear head", path=str(path))
        self._features: list[torch.Tensor] = []
        self._lock = threading.Lock()
        linears[-1].register_forward_hook(lambda m, inp, out: self._features.append(inp[0]))
        self.identity = f"package:{self.sha256}"
        self.dim = int(self(np.zeros((1, self.size, self.size, 3), np.uint8)).shape[1])

    @torch.inference_mode()
    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                                antialias=True, align_corners=False)
        with self._lock:  # the hook's list is shared: one batch at a time
            self._features.clear()
            self.model(x)
            feats = self._features[-1]
        return feats.float().reshape(len(x), -1).numpy()

    def describe(self) -> dict[str, Any]:
        return {"kind": "package", "path": self.path, "sha256": self.sha256, "dim": self.dim}


_ENCODERS: dict[tuple[str, str | None], Encoder] = {}
_ENCODERS_LOCK = threading.Lock()


def make_encoder(spec: str | dict[str, Any]) -> Encoder:
    """``"stats"``, a package path, or a stored description (``{"kind", "path", "sha256"}``);
    encoders are built once per process."""
    if isinstance(spec, dict):
        kind, path, digest = spec.get("kind"), spec.get("path"), spec.get("sha256")
    else:
        kind, path, digest = ("stats", None, None) if spec == "stats" else ("package", spec, None)
    if kind not in ("stats", "package") or (kind == "package" and not path):
        raise ConfigError(f"unknown tile encoder {spec!r}",
                          hint="use 'stats' or the folder of a trained tile-classifier package")
    if isinstance(spec, dict) and kind == "package" and not (Path(path) / "manifest.json").is_file():
        from meddx.modalities.pathology.bundle import REPACKAGE_HINT

        # a slide package made before packages carried their encoder names it by path
        raise ModelError(f"the tile encoder this slide model was trained with is neither in its "
                         f"package nor at {path}", path=str(path), hint=REPACKAGE_HINT)
    with _ENCODERS_LOCK:
        key = (kind, str(path) if path else None)
        if key not in _ENCODERS:
            _ENCODERS[key] = StatsEncoder() if kind == "stats" else PackageEncoder(path, digest)
        enc = _ENCODERS[key]
    if digest and getattr(enc, "sha256", digest) != digest:
        raise ConfigError("the tile encoder package changed since the model was trained",
                          path=str(path), hint="give the encoder package the model was trained "
                          "with; a slide package made now carries it (`meddx wsi embed-encoder`)")
    return enc


# -------------------------------------------------------------------------------- bags
@dataclass
class Bag:
    """A slide as the model sees it.

    Attributes:
        features: ``(N, D)`` tile embeddings.
        coords: ``(N, 2)`` level-0 top-left ``x, y`` of each tile.
        tissue: ``(N,)`` tissue fraction of each tile.
        level0_size: tile side in level-0 pixels.
        slide_dimensions: level-0 ``(width, height)``.
        slide_sha256: digest of the slide file (identifies the slide without naming it).
        slide: the slide's path where known (for thumbnails; never written to the cache).
        mpp: the slide's level-0 µm per pixel used for tiling.
    """

    features: torch.Tensor
    coords: np.ndarray
    tissue: np.ndarray
    level0_size: int
    slide_dimensions: tuple[int, int]
    slide_sha256: str
    slide: str | None = None
    mpp: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.coords)


_DIGESTS: dict[tuple[str, int, int], str] = {}


def slide_sha256(path: str | Path) -> str:
    """sha256 of a slide file (remembered per path, size and modification time); of a DICOM
    slide folder, the sha256 of its files' sorted digests (names do not count)."""
    p = Path(path)
    if p.is_dir():
        parts = sorted(slide_sha256(f) for f in p.iterdir() if f.is_file())
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def bag_key(digest: str, encoder: Encoder, tiles: TileSettings, mpp: float | None) -> str:
    """The cache key: slide bytes, encoder, tiling (and a forced slide mpp)."""
    raw = json.dumps({"v": CACHE_VERSION, "slide": digest, "encoder": encoder.identity,
                      "tiles": tiles.describe(), "slide_mpp": mpp}, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()


def _cache_path(key: str, cache: Path | None) -> Path:
    from meddx.catalog import cache_dir

    return (cache or cache_dir() / "pathology") / f"{key}.safetensors"


def load_bag(path: str | Path, slide: str | None = None) -> Bag:
    """Read a cached bag (safetensors; no pickle)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            head = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except Exception as e:  # safetensors raises its own error types
        raise DataError(f"cached bag cannot be read ({e})", path=str(path),
                        hint="delete it; it is recomputed from the slide") from e
    dims = json.loads(head.get("slide_dimensions", "[0, 0]"))
    return Bag(features=t["features"].float(), coords=t["coords"].numpy().astype(np.int64),
               tissue=t["tissue"].numpy(), level0_size=int(head.get("level0_size", 0)),
               slide_dimensions=(int(dims[0]), int(dims[1])),
               slide_sha256=head.get("slide_sha256", ""), slide=slide,
               mpp=float(head["mpp"]) if head.get("mpp") else None,
               meta={"cache": str(path)})


def _save_bag(bag: Bag, path: Path, encoder: Encoder, tiles: TileSettings) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    head = {"slide_sha256": bag.slide_sha256, "level0_size": str(bag.level0_size),
            "slide_dimensions": json.dumps(list(bag.slide_dimensions)),
            "mpp": str(bag.mpp or ""), "encoder": encoder.identity,
            "tiles": json.dumps(tiles.describe()), "version": CACHE_VERSION}
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    save_file({"features": bag.features.contiguous(),
               "coords": torch.from_numpy(np.ascontiguousarray(bag.coords, dtype=np.int64)),
               "tissue": torch.from_numpy(np.ascontiguousarray(bag.tissue, dtype=np.float32))},
              str(tmp), metadata=head)
    os.replace(tmp, path)


def _normalizer(stain: dict[str, Any] | None) -> Any:
    if not stain:
        return None
    from meddx.modalities.pathology.stain import MacenkoNormalizer

    norm = MacenkoNormalizer()
    norm.stain_matrix_ = np.asarray(stain["stain_matrix"], dtype=np.float64)
    norm.max_conc_ = np.asarray(stain["max_conc"], dtype=np.float64)
    return norm


def embed_tiles(batches: Any, encoder: Encoder, normalizer: Any = None,
                progress: Callable[[int], None] | None = None,
                cancel: threading.Event | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Embed a stream of ``(coords (B, 2), tiles (B, H, W, 3))`` batches →
    ``(coords (N, 2), features (N, D))``; ``progress(done)`` after each batch, stopping with
    :class:`Cancelled` when ``cancel`` is set."""
    coords, feats, done = [], [], 0
    for xy, tiles in batches:
        if cancel is not None and cancel.is_set():
            raise Cancelled("the job was cancelled")
        if normalizer is not None:
            tiles = np.stack([_safe_stain(normalizer, t) for t in tiles])
        coords.append(np.asarray(xy, dtype=np.int64))
        feats.append(encoder(tiles))
        done += len(tiles)
        if progress is not None:
            progress(done)
    if not feats:
        return np.zeros((0, 2), np.int64), np.zeros((0, encoder.dim), np.float32)
    return np.concatenate(coords), np.concatenate(feats).astype(np.float32)


def _safe_stain(normalizer: Any, tile: np.ndarray) -> np.ndarray:
    try:
        return normalizer.transform(tile)
    except (ValueError, np.linalg.LinAlgError, MeddxError):
        return tile  # a tile with too little stain to estimate its vectors is kept as it is


def embed_slide(path: str | Path, encoder: Encoder, tiles: TileSettings, *,
                mpp: float | None = None, cache: Path | None = None, use_cache: bool = True,
                progress: Callable[[int, int], None] | None = None,
                cancel: threading.Event | None = None, batch_size: int = 64) -> Bag:
    """The slide's bag, from the cache or computed (then cached).

    Args:
        path: the slide file, or a folder holding one DICOM WSI series' instances.
        encoder: tile encoder.
        tiles: tiling and stain normalisation.
        mpp: level-0 µm/px for a slide whose file does not say (else its own).
        cache: cache folder (default ``cache_dir()/pathology``).
        use_cache: read and write the cache (False: always compute, write nothing).
        progress: ``progress(tiles_done, tiles_total)``.
        cancel: set to stop (raises :class:`Cancelled`).

    Raises:
        DataError: unreadable slide, no resolution (naming ``--mpp``), no tissue tile.
    """
    from meddx.modalities.pathology.slide import open_slide
    from meddx.modalities.pathology.tiling import iter_tiles, tile_index

    p = Path(path)
    if not (p.is_file() or p.is_dir()):  # a folder: a DICOM WSI series' instances
        raise DataError("slide file not found", path=str(p))
    digest = slide_sha256(p)
    target = _cache_path(bag_key(digest, encoder, tiles, mpp), cache)
    if use_cache and target.is_file():
        bag = load_bag(target, slide=str(p))
        if progress is not None:
            progress(len(bag), len(bag))
        return bag
    with open_slide(p, mpp=mpp) as slide:
        index = tile_index(slide, mpp=tiles.mpp, size=tiles.size, min_tissue=tiles.min_tissue)
        total = len(index.coords)
        if total == 0:
            raise DataError("no tile of the slide holds enough tissue", path=p.name,
                            hint=f"lower min_tissue (now {tiles.min_tissue})")
        done = (lambda n: progress(n, total)) if progress is not None else None
        if done is not None:
            done(0)  # the tiles are known: a job says how many before the first is read
        xy, feats = embed_tiles(iter_tiles(slide, index, batch_size=batch_size), encoder,
                                _normalizer(tiles.stain), done, cancel)
        order = {tuple(c): i for i, c in enumerate(np.asarray(index.coords).tolist())}
        tissue = np.asarray([index.tissue[order[tuple(c)]] for c in xy.tolist()], np.float32)
        bag = Bag(features=torch.from_numpy(feats), coords=xy, tissue=tissue,
                  level0_size=int(index.level0_size),
                  slide_dimensions=tuple(int(v) for v in slide.dimensions),
                  slide_sha256=digest, slide=str(p), mpp=float(slide.mpp))
    if use_cache:
        _save_bag(bag, target, encoder, tiles)
        bag.meta["cache"] = str(target)
    return bag


def _read_package(root: Path) -> tuple[dict[str, Any], str, torch.nn.Module]:
    """A tile classifier's card, weights digest and network, read from its package folder
    with every file checked against the manifest (the package format of
    :mod:`meddx.package`, read here with the modality layer's own registry so that a slide
    model's encoder does not make this folder depend on the layers above it)."""
    import hashlib
    import json

    from safetensors.torch import load_file

    from meddx.modalities import get_modality
    from meddx.modalities.networks import network_builder
    from meddx.tasks import TaskSpec

    try:
        manifest = json.loads((root / "manifest.json").read_text())
        for name in ("card.json", "weights.safetensors"):
            digest = hashlib.sha256((root / name).read_bytes()).hexdigest()
            if manifest.get(name) != digest:
                raise ConfigError(f"encoder package file {name} was changed or is not listed "
                                  "(sha256 mismatch)", path=str(root))
        card = json.loads((root / "card.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"not a model package: {e}", path=str(root),
                          hint="give the folder of a trained tile classifier (runs/<name>/model)"
                          ) from e
    builder = network_builder(card["network"]["name"])
    if builder is None:
        raise ConfigError(f"unknown network '{card['network']['name']}' in the encoder package",
                          path=str(root))
    spec = get_modality(card["modality"]).network_spec(card["preprocessing"])
    outputs = TaskSpec.model_validate(card["task"]).num_outputs
    model = builder(num_outputs=outputs, **spec, **card["network"].get("options", {}))
    model.load_state_dict(load_file(str(root / "weights.safetensors")), strict=True)
    return card, manifest["weights.safetensors"], model.eval()
