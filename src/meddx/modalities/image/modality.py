"""Medical images in 2D and 3D: MedMNIST ``.npz``, image folders with a labels CSV, ISIC 2017.

File decoding (PNG/JPEG, DICOM, NIfTI, ``.npy``) lives in :mod:`meddx.modalities.image.io`,
folder datasets in :mod:`meddx.modalities.image.folder`; this module adapts them to the
modality contract and owns augmentation.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from meddx.errors import ConfigError, DataError, InputMismatchError
from meddx.modalities.base import DataBundle, Modality, Sample, Split, carve_split

__all__ = ["ImageModality", "load_medmnist"]

logger = logging.getLogger(__name__)


class ImageOptions(BaseModel):
    """``data.options`` for images."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str | None = None  # medmnist | folder | isic2017 (taken from the catalog)
    spatial_dims: int | None = None
    channels: int | None = None
    labels_csv: str | None = None  # folder datasets: path,label[,patient_id][,split][,meta…]
    kind: str | None = None  # folder datasets: task kind
    positive_class: str | None = None
    preload: bool = True
    dicom_modality: str | None = None  # expected DICOM Modality (CT, MR, US …) for input checks
    normalize: str = "dtype-range"  # dtype-range | image-minmax | zscore | window | none
    window: str | list[float] | None = None  # CT window preset (lung, brain …) or [center, width]
    resize: str = "resize"  # resize | pad-crop


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as e:
        raise DataError(
            "MedMNIST file is corrupt or truncated",
            path=str(path),
            hint="delete it and download again (`meddx datasets --download NAME`)",
        ) from e


def load_medmnist(path: Path, task: Any, spatial_dims: int, limit: int | None = None
                  ) -> dict[str, Split]:
    """Read a MedMNIST ``.npz`` (any size, 2D or 3D) into train/val/test splits.

    Images stay uint8 (N, H, W[, C]) or (N, D, H, W); labels (N,), (N, 1) or (N, L).
    """
    arrays = _npz_arrays(path)
    splits = {}
    for name in ("train", "val", "test"):
        key_x, key_y = f"{name}_images", f"{name}_labels"
        if key_x not in arrays or key_y not in arrays:
            raise DataError(f"MedMNIST file has no '{key_x}'/'{key_y}' arrays", path=str(path))
        x, y = arrays[key_x], arrays[key_y]
        if len(x) != len(y):
            raise DataError(f"{name}: {len(x)} images but {len(y)} labels", path=str(path))
        expected = spatial_dims + (1 if x.ndim == spatial_dims + 2 else 0) + 1
        if x.ndim != expected:
            raise DataError(
                f"{name} images have shape {x.shape}; expected {spatial_dims}D images",
                path=str(path),
            )
        if limit:
            x, y = x[:limit], y[:limit]
        ids = [f"{name}_{i}" for i in range(len(x))]
        targets = _encode_all(task, y, ids)
        splits[name] = Split(name=name, inputs=x, targets=targets, ids=ids)
    return splits


def _encode_all(task: Any, labels: np.ndarray, ids: list[str]) -> np.ndarray:
    if task.kind == "multilabel":
        return np.stack([task.encode(row, sid) for row, sid in zip(labels, ids, strict=True)])
    flat = labels.reshape(len(labels), -1)
    if flat.shape[1] != 1:
        raise DataError(f"labels have shape {labels.shape}; a {task.kind} task needs one per image")
    return np.asarray([task.encode(v, sid) for v, sid in zip(flat[:, 0], ids, strict=True)],
                      dtype=np.int64)


def _to_channel_first(x: np.ndarray, spatial_dims: int, channels: int) -> np.ndarray:
    """(H, W), (H, W, C), (C, H, W), (D, H, W) or (C, D, H, W) → channel-first."""
    if x.ndim == spatial_dims:
        return x[None]
    if x.ndim == spatial_dims + 1:
        if spatial_dims == 2 and x.shape[-1] in (1, 3, 4) and x.shape[0] not in (1, 3):
            return np.moveaxis(x, -1, 0)
        return x
    raise InputMismatchError(
        f"input has {x.ndim} dimensions; the model takes {spatial_dims}D images "
        f"with {channels} channel(s)"
    )


def _scale(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if x.dtype == np.uint16:
        return x.astype(np.float32) / 65535.0
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise InputMismatchError("image contains NaN or infinite values")
    if x.min() < -0.5 or x.max() > 1.5:
        raise InputMismatchError(
            f"float image values span {x.min():.3g}..{x.max():.3g}; the model expects 0..1",
            hint="pass 8/16-bit integers or scale the array to 0..1",
        )
    return x


class ImageModality(Modality):
    """2D/3D images. ``input_spec``: spatial_dims, channels, size, normalize, format."""

    name = "image"
    Options = ImageOptions

    # ---------------------------------------------------------------- reading
    def load(self, data: Any, entry: Any | None, task: Any | None, seed: int) -> DataBundle:
        opts = self.parse_options({**(entry.options if entry else {}), **data.options})
        fmt = opts.format or ("folder" if data.path else None)
        if task is None:
            task = entry.task if entry else None
        if fmt == "medmnist":
            return self._load_medmnist(data, entry, task, opts, seed)
        if fmt in ("folder", "isic2017"):
            return self._load_folder(data, entry, task, opts, seed, fmt)
        raise ConfigError(f"unknown image data format '{fmt}'; use medmnist, folder or isic2017")

    def _load_medmnist(self, data: Any, entry: Any, task: Any, opts: ImageOptions, seed: int
                       ) -> DataBundle:
        from meddx.catalog import resolve

        size = data.size or (entry.default_size if entry else 28)
        path = Path(data.path) if data.path else resolve(entry, size)[0]
        spatial = opts.spatial_dims or 2
        splits = load_medmnist(path, task, spatial, data.limit)
        held = int(splits["train"].inputs.shape[1])  # the file's own image size
        if data.size and held != data.size:
            raise DataError(f"the file holds {held}-px images, not the {size} px asked for",
                            path=str(path), hint=f"set data.size to {held}, or use the "
                            f"{size}-px file")
        size = held
        channels = 1 if splits["train"].inputs.ndim == spatial + 1 else splits["train"].inputs.shape[-1]
        if opts.channels and opts.channels != channels:
            raise DataError(f"expected {opts.channels} channels, file has {channels}", path=str(path))
        splits = self._with_calib(splits, task, data.calib_fraction, seed)
        spec = {"spatial_dims": spatial, "channels": int(channels), "size": int(size),
                "normalize": "dtype-range", "format": "medmnist", "value_range": [0, 255]}
        return DataBundle(
            dataset=entry.name if entry else str(path),
            modality=self.name,
            task=task,
            splits=splits,
            input_spec=spec,
            info=_info(entry, path),
        )

    def _load_folder(self, data: Any, entry: Any, task: Any, opts: ImageOptions, seed: int,
                     fmt: str) -> DataBundle:
        from meddx.modalities.image import folder as image_folder

        size = data.size or (entry.default_size if entry else 224)
        spec = {"spatial_dims": opts.spatial_dims or 2, "channels": opts.channels or 3,
                "size": int(size), "normalize": opts.normalize, "format": fmt,
                "resize": opts.resize}
        if opts.window is not None:
            spec["window"] = opts.window
        if opts.dicom_modality:
            spec["dicom_modality"] = opts.dicom_modality
        if fmt == "isic2017":
            from meddx.catalog import resolve

            root = resolve(entry, None)[0].parent
            splits, extra = image_folder.load_isic2017(
                root, input_spec=spec, seed=seed, calib_fraction=data.calib_fraction,
                limit=data.limit, preload=opts.preload)
            path = root
        else:
            if not data.path:
                raise ConfigError("a folder dataset needs data.path (the image folder)")
            if task is None:
                raise ConfigError("a folder dataset needs a task (task.kind and class names)")
            path = Path(data.path)
            splits, extra = image_folder.load_folder_dataset(
                path, opts.labels_csv or "labels.csv", task=task, seed=seed,
                val_fraction=data.val_fraction, test_fraction=data.test_fraction,
                calib_fraction=data.calib_fraction, input_spec=spec, limit=data.limit,
                preload=opts.preload)
        info = _info(entry, path)
        info.update(extra or {})
        return DataBundle(dataset=entry.name if entry else str(path), modality=self.name,
                          task=task, splits=splits, input_spec=spec, info=info)

    @staticmethod
    def _with_calib(splits: dict[str, Split], task: Any, fraction: float, seed: int
                    ) -> dict[str, Split]:
        if fraction <= 0:
            return splits
        strat = task.target_index(splits["train"].targets) if task.kind != "multilabel" else None
        train, calib = carve_split(splits["train"], fraction, seed, strat, "calib")
        return {"train": train, "val": splits["val"], "calib": calib, "test": splits["test"]}

    def item_tensor(self, item: Any, input_spec: dict[str, Any]) -> torch.Tensor:
        if isinstance(item, torch.Tensor):  # preloaded folder datasets are already on the grid
            return item.float()
        if isinstance(item, str | Path):
            return self._read_file(item, input_spec, name=None)
        x = _to_channel_first(np.asarray(item), input_spec["spatial_dims"], input_spec["channels"])
        return torch.from_numpy(np.ascontiguousarray(_scale(x)))

    def read(self, source: Any, input_spec: dict[str, Any]) -> Sample:
        """Read a path, ``{"name", "data"}`` upload, bytes, array or tensor as the model's input."""
        if isinstance(source, torch.Tensor):
            source = source.detach().cpu().numpy()
        if isinstance(source, np.ndarray):
            x = self.item_tensor(source, input_spec)
            self._check_grid(x, input_spec)
            return Sample(id="", tensor=x, meta={"format": "array"})
        name = None
        if isinstance(source, dict):
            if "resourceType" in source:  # FHIR: only Binary, Media, DocumentReference hold one
                from meddx.fhir.resources import attachment_from_resource

                source, _, name = attachment_from_resource(source)
            else:
                name, source = source.get("name"), source.get("data")
                name = name if isinstance(name, str) else None
                if source is None:
                    raise DataError("an image input given as an object needs 'data' (the "
                                    "file's bytes)", hint="or send a FHIR Binary, Media or "
                                    "DocumentReference")
        if isinstance(source, str | Path):
            p = Path(source)
            try:
                found = p.is_file()
            except (OSError, ValueError) as e:  # a name too long, a NUL byte
                raise DataError(f"not a usable file path: {type(e).__name__}",
                                path=str(p)[:120]) from e
            if not found:
                raise DataError("input file not found", path=str(p))
            x = self._read_file(p, input_spec, name=p.name)
            return Sample(id=p.name, tensor=x, meta={"path": str(p)})
        if isinstance(source, bytes | bytearray):
            x = self._read_file(bytes(source), input_spec, name=name)
            return Sample(id=name or "upload", tensor=x, meta={})
        raise DataError(f"cannot read an image from {type(source).__name__}")

    def _read_file(self, source: Any, input_spec: dict[str, Any], name: str | None) -> torch.Tensor:
        from meddx.modalities.image.io import check_input, read_image, to_model_grid

        image = read_image(source, name=name)
        check_input(image, input_spec, name=name)
        return to_model_grid(image, channels=input_spec["channels"],
                             spatial_dims=input_spec["spatial_dims"], size=input_spec["size"],
                             normalize=input_spec.get("normalize", "dtype-range"),
                             window=input_spec.get("window"),
                             resize=input_spec.get("resize", "resize"), name=name)

    @staticmethod
    def _check_grid(x: torch.Tensor, spec: dict[str, Any]) -> None:
        want = (spec["channels"], *([spec["size"]] * spec["spatial_dims"]))
        if tuple(x.shape) != want:
            raise InputMismatchError(
                f"array has shape {tuple(x.shape)} after channel handling; the model takes {want}",
                hint="pass an image file to have it resized, or resize the array",
            )

    # ---------------------------------------------------------- augmentation
    def batch_transforms(self, input_spec: dict[str, Any], augment: Any) -> Any:
        """Random flips, rotation/scale and intensity on whole batches (per-sample MONAI
        transforms cost ~9 ms an image here, more than the training step itself)."""
        if augment is None or not augment.enabled:
            return None
        from meddx.modalities.image.augment import BatchAugment

        return BatchAugment(spatial_dims=input_spec["spatial_dims"], flips=augment.flips,
                            rotate_degrees=augment.rotate_degrees, intensity=augment.intensity,
                            noise=augment.noise)

    def contrastive_views(self, input_spec: dict[str, Any] | None) -> Any:
        """SimCLR's views (random resized crop, flips, rotation, colour jitter; blur from
        64 px up) made on whole batches; see :mod:`meddx.modalities.image.contrastive`."""
        if input_spec is None:
            return None
        from meddx.modalities.image.contrastive import ContrastiveViews

        size = input_spec.get("size") or 0
        return ContrastiveViews(spatial_dims=input_spec["spatial_dims"],
                                channels=input_spec["channels"],
                                blur_prob=0.5 if size >= 64 else 0.0)

    # ------------------------------------------------------------- models
    def default_network(self, task: Any, input_spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return "resnet18", {}

    def explainer(self, model: torch.nn.Module, input_spec: dict[str, Any], **options: Any) -> Any:
        from meddx.modalities.image.explain import ImageExplainer

        return ImageExplainer(model, input_spec, **options)

    def to_fhir(self, prediction: Any, card: Any) -> dict[str, Any]:
        from meddx.fhir.resources import diagnostic_report_bundle

        return diagnostic_report_bundle(prediction, card)

    def fhir_report(self, prediction: Any, card: Any, *, heatmap_png: bytes | None = None,
                    subject: str | None = None, research_only: bool | None = None,
                    **context: Any) -> dict[str, Any] | None:
        """A DiagnosticReport (+ Device, + the Grad-CAM overlay as a Media) per image."""
        from meddx.fhir.resources import diagnostic_report_bundle

        return diagnostic_report_bundle(prediction, card, heatmap_png=heatmap_png,
                                        subject=subject, research_only=research_only)

    def check_served(self, sample: Sample, input_spec: dict[str, Any],
                     pixels: int | None = None) -> None:
        """Blank, far too small or out-of-range images are refused (see
        :func:`meddx.modalities.image.grid.check_plausible`)."""
        from meddx.modalities.image.grid import check_plausible

        check_plausible(sample.tensor, input_spec, pixels)


def _info(entry: Any, path: Path) -> dict[str, Any]:
    if entry is None:
        return {"source": str(path)}
    return {"source": str(path), "title": entry.title, "license": entry.license,
            "citation": entry.citation, "homepage": entry.homepage}
