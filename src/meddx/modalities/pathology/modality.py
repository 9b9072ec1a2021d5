"""Whole-slide pathology: slide-level labels from bags of tile embeddings (ABMIL).

``data.path`` is a CSV ``slide,label[,patient_id][,split][,metadata…]`` (slide paths relative to
the CSV's folder). Each slide is cut into tissue tiles at ``tile_mpp`` µm/px
(:mod:`~meddx.modalities.pathology.tiling`), each tile embedded by the encoder, and the bag
cached (:mod:`~meddx.modalities.pathology.embeddings`): training reads only the cache. Splits
follow the image-folder rules (a ``split`` column is honoured, ``patient_id`` keeps a patient's
slides on one side, calib is carved from train).

Pipeline::

    slide ─open_slide─► tile_index ─iter_tiles─► (stain) ─encoder─► bag (N, D) ─► abmil
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from meddx.errors import ConfigError, DataError, InputMismatchError
from meddx.modalities.base import DataBundle, Modality, Sample
from meddx.modalities.pathology.embeddings import (
    Bag,
    TileSettings,
    embed_slide,
    load_bag,
    make_encoder,
)

__all__ = ["PathologyModality", "PathologyOptions", "BagRef"]

logger = logging.getLogger(__name__)


class PathologyOptions(BaseModel):
    """``data.options`` for slide datasets.

    Args:
        tile_mpp / tile_size / min_tissue: tiling (µm per pixel, pixels, tissue fraction).
        encoder: ``stats`` (colour/texture statistics, no download) or the folder of a trained
            tile-classifier package (its penultimate features).
        stain: Macenko stain normalisation of every tile to a reference fitted on the first
            training slide (stored with the model).
        max_tiles: bag size cap: training draws this many tiles at random each epoch;
            evaluation and prediction take an evenly spaced subset of this size.
        slide_mpp: level-0 µm/px for slides whose files carry no resolution.
        kind / positive_class: the task when the config gives none (labels from the CSV).
        labels_csv: the CSV name when ``data.path`` is a folder.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    tile_mpp: float = Field(0.5, gt=0)
    tile_size: int = Field(224, ge=8)
    min_tissue: float = Field(0.5, ge=0, le=1)
    encoder: str = "stats"
    stain: bool = False
    max_tiles: int = Field(1024, ge=1)
    slide_mpp: float | None = Field(None, gt=0)
    kind: str | None = None
    positive_class: str | None = None
    labels_csv: str = "slides.csv"


@dataclass(frozen=True)
class BagRef:
    """A split item: the cached bag and the slide it came from."""

    cache: str
    slide: str


def _standardise(features: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    mean = spec.get("feature_mean")
    if mean is None:
        return features.float()
    m = torch.as_tensor(mean, dtype=torch.float32)
    s = torch.as_tensor(spec["feature_std"], dtype=torch.float32)
    return (features.float() - m) / s


def cap_bag(bag: Bag, max_tiles: int, rng: np.random.Generator | None = None) -> Bag:
    """At most ``max_tiles`` tiles: a random draw with ``rng``, else evenly spaced."""
    n = len(bag)
    if n <= max_tiles:
        return bag
    if rng is not None:
        keep = np.sort(rng.choice(n, max_tiles, replace=False))
    else:
        keep = np.linspace(0, n - 1, max_tiles).round().astype(int)
    return replace(bag, features=bag.features[torch.from_numpy(keep)], coords=bag.coords[keep],
                   tissue=bag.tissue[keep])


class RandomTiles:
    """Training transform: a fresh random subset of at most ``max_tiles`` tiles per epoch."""

    def __init__(self, max_tiles: int, seed: int = 0) -> None:
        self.max_tiles = max_tiles
        self.rng = np.random.default_rng(seed)

    def __call__(self, bag: Bag) -> Bag:
        return cap_bag(bag, self.max_tiles, self.rng)


class PathologyModality(Modality):
    """Slides → bags of tile embeddings → slide label."""

    name = "pathology"
    reads_in_jobs = True
    reads_slides = True
    Options = PathologyOptions
    upload_content_types = frozenset({"image/tiff", "application/octet-stream"})
    upload_hint = "send the slide (TIFF, SVS …) as a job: POST /v1/models/{name}/jobs"
    input_hint = upload_hint

    # ---------------------------------------------------------------- loading
    def _frame(self, data: Any, opts: PathologyOptions) -> tuple[pd.DataFrame, Path, Path]:
        if not data.path:
            raise ConfigError("a slide dataset needs data.path (a CSV slide,label[,patient_id]"
                              "[,split])")
        p = Path(data.path)
        csv = p / opts.labels_csv if p.is_dir() else p
        if not csv.is_file():
            raise DataError("slide CSV not found", path=str(csv),
                            hint="columns: slide,label[,patient_id][,split]")
        try:
            frame = pd.read_csv(csv, dtype=str, keep_default_na=False, skipinitialspace=True)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise DataError(f"slide CSV cannot be parsed ({e})", path=str(csv)) from e
        frame.columns = [str(c).strip() for c in frame.columns]
        missing = [c for c in ("slide", "label") if c not in frame.columns]
        if missing:
            raise DataError(f"slide CSV lacks column(s) {missing}; found {list(frame.columns)}",
                            path=str(csv), hint="columns: slide,label[,patient_id][,split]")
        if "path" in frame.columns:
            raise DataError("slide CSV has both 'slide' and 'path' columns", path=str(csv))
        return frame.rename(columns={"slide": "path"}), csv.parent, csv

    def load(self, data: Any, entry: Any | None, task: Any | None, seed: int) -> DataBundle:
        """Read the slide CSV, embed every slide once (cached), split by the folder rules."""
        from meddx.modalities import labelled

        opts = self.parse_options({**(entry.options if entry else {}), **data.options})
        frame, root, csv = self._frame(data, opts)
        if task is None:
            labels = [str(v).strip() for v in frame["label"]]
            kind = opts.kind or ("binary" if opts.positive_class else "multiclass")
            task = labelled.infer_folder_task(labels, kind, opts.positive_class)
        table = labelled.labelled_table(frame, root, task, csv.name)
        split_col = labelled.split_column(frame, csv.name) if "split" in frame.columns else None
        fractions = {"val": data.val_fraction, "test": data.test_fraction,
                     "calib": data.calib_fraction}
        splits, notes = labelled.make_splits(table, split_col, task, seed, fractions)
        splits = {k: labelled.limit_split(s, data.limit, task, seed) for k, s in splits.items()}
        encoder = make_encoder(opts.encoder)
        stain = self._stain_reference(splits["train"].inputs[0], opts) if opts.stain else None
        tiles = TileSettings(opts.tile_mpp, opts.tile_size, opts.min_tissue, stain)
        for s in splits.values():
            s.inputs = [self._embed(path, encoder, tiles, opts) for path in s.inputs]
        spec = self._spec(encoder, tiles, opts, splits["train"].inputs)
        info = {"source": str(csv), "split_method": "; ".join(notes),
                "patient_level_split": table.patient_ids is not None,
                "task": task.model_dump(mode="json"),
                "tiles_per_slide": self._tile_counts(splits)}
        return DataBundle(dataset=str(csv), modality=self.name, task=task, splits=splits,
                          input_spec=spec, info=info)

    @staticmethod
    def _embed(path: str, encoder: Any, tiles: TileSettings, opts: PathologyOptions) -> BagRef:
        bag = embed_slide(path, encoder, tiles, mpp=opts.slide_mpp)
        return BagRef(cache=bag.meta["cache"], slide=str(path))

    @staticmethod
    def _stain_reference(slide_path: str, opts: PathologyOptions) -> dict[str, Any]:
        from meddx.modalities.pathology.slide import open_slide
        from meddx.modalities.pathology.stain import MacenkoNormalizer
        from meddx.modalities.pathology.tiling import tissue_mask

        with open_slide(slide_path, mpp=opts.slide_mpp) as slide:
            thumb = slide.thumbnail(1024)
            mask, _ = tissue_mask(slide, max_side=max(thumb.shape[:2]))
        if mask.shape != thumb.shape[:2]:
            from PIL import Image

            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
                (thumb.shape[1], thumb.shape[0]), Image.NEAREST)) > 0
        pixels = thumb[mask] if mask.any() else thumb.reshape(-1, 3)
        norm = MacenkoNormalizer().fit(pixels.reshape(1, -1, 3))
        return {"stain_matrix": np.asarray(norm.stain_matrix_).tolist(),
                "max_conc": np.asarray(norm.max_conc_).tolist(),
                "fitted_on": "thumbnail tissue of the first training slide"}

    @staticmethod
    def _spec(encoder: Any, tiles: TileSettings, opts: PathologyOptions,
              train: list[BagRef]) -> dict[str, Any]:
        feats = torch.cat([load_bag(r.cache).features for r in train])
        mean = feats.mean(0)
        std = feats.std(0).clamp_min(1e-6) if len(feats) > 1 else torch.ones_like(mean)
        return {"format": "wsi-bag", "spatial_dims": 0, "channels": int(encoder.dim),
                "encoder": encoder.describe(), "tiles": tiles.describe(),
                "max_tiles": int(opts.max_tiles), "slide_mpp": opts.slide_mpp,
                "feature_mean": mean.tolist(), "feature_std": std.tolist(),
                "standardised_on": "train tiles"}

    @staticmethod
    def _tile_counts(splits: dict[str, Any]) -> dict[str, float]:
        counts = [len(load_bag(r.cache)) for s in splits.values() for r in s.inputs]
        return {"min": int(min(counts)), "median": float(np.median(counts)),
                "max": int(max(counts))}

    # ---------------------------------------------------------------- items
    def item_tensor(self, item: Any, input_spec: dict[str, Any]) -> Bag:
        if isinstance(item, Bag):
            bag = item
        elif isinstance(item, BagRef):
            bag = load_bag(item.cache, slide=item.slide)
        else:
            raise DataError(f"a pathology item is a cached bag, not {type(item).__name__}")
        meta = {**bag.meta, "max_tiles": int(input_spec.get("max_tiles", 1024))}
        return replace(bag, features=_standardise(bag.features, input_spec), meta=meta)

    def transforms(self, train: bool, input_spec: dict[str, Any], augment: Any
                   ) -> Callable | None:
        if not train:
            return None
        return RandomTiles(int(input_spec.get("max_tiles", 1024)))

    def collate(self, batch: list[tuple[Any, Any]]) -> tuple[Any, torch.Tensor]:
        """Padded :class:`~meddx.modalities.pathology.networks.Bags` (each bag capped)."""
        from meddx.modalities.pathology.networks import pad_bags

        xs, ys = zip(*batch, strict=True)
        bags = [cap_bag(b, int(b.meta["max_tiles"])) if b.meta.get("max_tiles") else b
                for b in xs]
        y = torch.stack([torch.as_tensor(np.asarray(v)) for v in ys])
        return pad_bags([b.features for b in bags]), y

    # ---------------------------------------------------------------- reading
    def read_slide(self, path: str | Path, input_spec: dict[str, Any], *,
                   mpp: float | None = None, progress: Callable[[int, int], None] | None = None,
                   cancel: Any = None, use_cache: bool = True) -> Sample:
        """One slide file → :class:`Sample` whose tensor is its (standardised) bag.

        Raises:
            DataError: unreadable slide, no resolution without ``mpp``, no tissue.
            InputMismatchError: a model not trained on slides.
        """
        if input_spec.get("format") != "wsi-bag":
            raise InputMismatchError("this model was not trained on whole-slide images",
                                     hint=f"its preprocessing is {input_spec.get('format')!r}")
        t = input_spec["tiles"]
        tiles = TileSettings(float(t["mpp"]), int(t["size"]), float(t["min_tissue"]),
                             t.get("stain"))
        encoder = make_encoder(input_spec["encoder"])
        bag = embed_slide(path, encoder, tiles, mpp=mpp or input_spec.get("slide_mpp"),
                          progress=progress, cancel=cancel, use_cache=use_cache)
        bag = self.item_tensor(bag, input_spec)
        meta = {"n_tiles": len(bag), "slide_mpp": bag.mpp, "tile_mpp": tiles.mpp,
                "tile_size": tiles.size, "slide_sha256": bag.slide_sha256}
        return Sample(id=Path(path).name, tensor=bag, meta=meta)

    def read(self, source: Any, input_spec: dict[str, Any]) -> Sample:
        """A slide path, ``{"path", "mpp"}``, or an upload ``{"name", "data"}`` (written to a
        private temporary file, embedded without caching, removed)."""
        if isinstance(source, Bag):
            return Sample(id=source.slide_sha256[:12], tensor=self.item_tensor(source, input_spec))
        mpp = None
        if isinstance(source, dict) and "path" in source:
            mpp, source = source.get("mpp"), source["path"]
        if isinstance(source, dict) and "data" in source:
            import tempfile

            suffix = Path(str(source.get("name") or "slide.tiff")).suffix or ".tiff"
            with tempfile.TemporaryDirectory(prefix="meddx-slide-") as tmp:
                p = Path(tmp) / f"upload{suffix}"
                p.write_bytes(bytes(source["data"]))
                sample = self.read_slide(p, input_spec, use_cache=False)
            sample.tensor = replace(sample.tensor, slide=None)
            sample.id = "upload"
            return sample
        if isinstance(source, str | Path):
            return self.read_slide(source, input_spec, mpp=mpp)
        raise DataError(f"cannot read a slide from {type(source).__name__}",
                        hint="give the slide's path")

    # ---------------------------------------------------------------- models
    def default_network(self, task: Any, input_spec: dict[str, Any]
                        ) -> tuple[str, dict[str, Any]]:
        return "abmil", {}

    def network_spec(self, input_spec: dict[str, Any]) -> dict[str, Any]:
        return {"spatial_dims": 0, "in_channels": int(input_spec["channels"]), "size": None}

    def explainer(self, model: torch.nn.Module, input_spec: dict[str, Any], **options: Any
                  ) -> Any:
        """:class:`~meddx.modalities.pathology.explain.SlideExplainer`: attention per tile,
        drawn over the thumbnail with a gallery of the top tiles."""
        from meddx.modalities.pathology.explain import SlideExplainer

        options.pop("network", None)
        options.pop("layer", None)
        options.pop("method", None)
        return SlideExplainer(model, input_spec, **options)

    def explanation_map(self, sample: Any, attribution: Any, shape: tuple[int, int]
                        ) -> np.ndarray:
        """Per-tile attention ranked into [0, 1] and drawn over the whole slide at ``shape``
        (each tile's square, on the slide's level-0 extent scaled to ``shape``)."""
        from meddx.modalities.pathology.explain import tile_map

        return tile_map(getattr(sample, "tensor", sample), np.asarray(attribution), shape)

    def to_fhir(self, prediction: Any, card: Any) -> dict[str, Any]:
        """A validated Bundle: DiagnosticReport (pathology) with per-class Observations."""
        from meddx.modalities.pathology.fhir import slide_report_bundle

        return slide_report_bundle(prediction, card)

    def fhir_report(self, prediction: Any, card: Any, *, heatmap_png: bytes | None = None,
                    subject: str | None = None, research_only: bool | None = None,
                    **context: Any) -> dict[str, Any] | None:
        """The pathology DiagnosticReport with the slide heat map as a Media."""
        from meddx.modalities.pathology.fhir import slide_report_bundle

        return slide_report_bundle(prediction, card, heatmap_png=heatmap_png, subject=subject,
                                   research_only=research_only, n_tiles=context.get("n_tiles"))

    # --------------------------------------------------------------- packaging
    def package_preprocessing(self, input_spec: dict[str, Any], root: Path) -> dict[str, Any]:
        """A package tile encoder is copied into the slide package (``encoder/``; see
        :mod:`~meddx.modalities.pathology.bundle`)."""
        from meddx.modalities.pathology.bundle import bundle_encoder

        return bundle_encoder(input_spec, root)

    def loaded_preprocessing(self, input_spec: dict[str, Any], root: Path,
                             manifest: dict[str, str]) -> dict[str, Any]:
        """The bundled tile encoder read from the package's own ``encoder/`` folder."""
        from meddx.modalities.pathology.bundle import resolve_encoder

        return resolve_encoder(input_spec, root, manifest)

    # ------------------------------------------------------------------ jobs
    def check_job_source(self, path: Path, input_spec: dict[str, Any],
                         options: dict[str, Any]) -> None:
        """Open the slide once (header only): a corrupt file or one without a resolution is
        refused with the reason (the latter naming ``slide_mpp`` / ``--slide-mpp``)."""
        from meddx.modalities.pathology.slide import open_slide

        mpp = options.get("mpp") or input_spec.get("slide_mpp")
        try:
            with open_slide(path, mpp=mpp):
                pass
        except DataError as e:
            if "resolution" in e.message.lower():
                raise DataError("the slide does not say its resolution (µm per pixel)",
                                hint="add ?slide_mpp=<µm per pixel at level 0> to the request, "
                                     "e.g. slide_mpp=0.25 for 40x (`--slide-mpp` in "
                                     "`meddx wsi`)") from e
            raise DataError(f"the slide cannot be read: {e.message}", hint=e.hint) from e
        except Exception as e:  # noqa: BLE001 — a reader's own error on a broken file
            raise DataError(f"the slide cannot be read ({type(e).__name__})",
                            hint="check that the file is a whole-slide image and is complete"
                            ) from e

    def read_job(self, path: Path, input_spec: dict[str, Any], options: dict[str, Any], *,
                 progress: Callable[[int, int], None] | None = None,
                 cancel: Any = None) -> Sample:
        """A slide on a job worker: tiles embedded with progress and cancel, not cached."""
        return self.read_slide(path, input_spec, mpp=options.get("mpp"), progress=progress,
                               cancel=cancel, use_cache=False)
