"""The modality contract and the data containers every modality fills.

A modality knows how to read its sources into a :class:`DataBundle` (train / val / calib /
test :class:`Split` objects plus the :class:`TaskSpec`), how to turn one stored item or one
user input into a model input tensor, which network suits it, how to explain a prediction,
and how to express a prediction in FHIR. The trainer, the predictor, the CLI and the service
only ever talk to this contract.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch.utils.data import Dataset

from meddx.errors import ConfigError, DataError
from meddx.modalities.splitting import SPLIT_NAMES, Split, carve_split

__all__ = [
    "Split",
    "DataBundle",
    "Sample",
    "Upload",
    "DeclaredSize",
    "TEXT_TYPES",
    "Modality",
    "SplitDataset",
    "carve_split",
    "SPLIT_NAMES",
]

logger = logging.getLogger(__name__)



@dataclass
class DataBundle:
    """A dataset read and split, ready for training and evaluation.

    Attributes:
        dataset: catalog name or path.
        modality: registry key of the modality that read it.
        task: the label space.
        splits: ``{"train", "val", "calib", "test"}`` → :class:`Split` (test may be absent).
        input_spec: what the network expects and how inputs are preprocessed; stored in the
            model card as ``preprocessing`` and used again at prediction time.
        info: provenance for the report and card (source, license, citation, notes).
    """

    dataset: str
    modality: str
    task: Any
    splits: dict[str, Split]
    input_spec: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise DataError(
                f"dataset '{self.dataset}' has no split '{name}'",
                hint=f"available splits: {', '.join(self.splits)}",
            )
        return self.splits[name]

    def summary(self) -> dict[str, Any]:
        """Counts per split and class, and whether splits are by patient."""
        out: dict[str, Any] = {"splits": {}, "patient_level_split": False}
        for name, s in self.splits.items():
            entry: dict[str, Any] = {"n": len(s)}
            if self.task.kind in ("binary", "multiclass", "ordinal"):
                idx = self.task.target_index(s.targets)
                counts = np.bincount(idx, minlength=self.task.num_classes)
                entry["classes"] = dict(zip(self.task.class_names, counts.tolist(), strict=True))
            elif self.task.kind == "multilabel":
                t = np.asarray(s.targets, dtype=float)
                entry["positives"] = dict(
                    zip(self.task.class_names, np.nansum(t, axis=0).astype(int).tolist(), strict=True)
                )
            out["splits"][name] = entry
            if s.patient_ids:
                out["patient_level_split"] = True
        return out


@dataclass
class Sample:
    """One model input read from a user's source (file, array, string, FHIR resource)."""

    id: str
    tensor: torch.Tensor | Any
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Upload:
    """One uploaded file: its bytes, the client's file name and declared content type."""

    data: bytes
    name: str | None
    content_type: str | None


@dataclass(frozen=True)
class DeclaredSize:
    """What an upload's header declares, read before anything is decoded (None: unknown).

    Attributes:
        pixels: pixels (voxels × frames).
        decoded_bytes: bytes the decoded array would take (pixels × channels × bytes per
            sample).
    """

    pixels: int | None = None
    decoded_bytes: int | None = None


#: content types a modality reading text/JSON files accepts; ``text/*``: any text type
TEXT_TYPES = frozenset({"text/plain", "text/csv", "application/json", "application/fhir+json",
                        "application/octet-stream", "text/*"})


class SplitDataset(Dataset[tuple[Any, Any]]):
    """Torch dataset over a split: ``modality.item_tensor`` then the transform."""

    def __init__(
        self,
        modality: Modality,
        split: Split,
        input_spec: dict[str, Any],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.modality = modality
        self.split = split
        self.input_spec = input_spec
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        x = self.modality.item_tensor(self.split.inputs[i], self.input_spec)
        if self.transform is not None:
            x = self.transform(x)
        y = self.split.targets[i]
        return x, torch.as_tensor(np.asarray(y))


class Modality(ABC):
    """What every modality provides. Subclasses register one line in ``modalities/__init__``.

    Class attributes:
        name: registry key.
        Options: pydantic model of the modality's ``data.options`` (extra keys are errors).
    """

    name: ClassVar[str]
    #: the CLI flag whose text this modality reads (``--smiles``, ``--sequence``), or None
    inline_flag: ClassVar[str | None] = None
    #: :meth:`to_fhir` answers with a RiskAssessment of its own (used on CDS cards)
    fhir_risk_assessment: ClassVar[bool] = False
    #: inputs are too large for a synchronous request: the service takes them as jobs
    #: (:meth:`check_job_source`, :meth:`read_job`)
    reads_in_jobs: ClassVar[bool] = False
    #: inputs are whole-slide images: :meth:`read` takes a slide file or a folder of a DICOM
    #: VL Whole Slide Microscopy series' instances (the PACS path routes such series here)
    reads_slides: ClassVar[bool] = False
    #: test-time flips keep the label (spatial images): ``model.options.tta`` is allowed
    flip_tta: ClassVar[bool] = False
    #: content types an uploaded file may declare (``text/*``: any text type)
    upload_content_types: ClassVar[frozenset[str]] = TEXT_TYPES
    #: the hint of a refused upload content type: what to send instead
    upload_hint: ClassVar[str] = "send the file as multipart/form-data"
    #: the hint of a refused JSON input: which JSON inputs the modality takes
    input_hint: ClassVar[str] = ('send the file as multipart/form-data or {"data": base64, '
                                 '"contentType": …}')

    class Options(BaseModel):
        model_config = ConfigDict(frozen=True, extra="forbid")

    def parse_options(self, options: dict[str, Any]) -> BaseModel:
        try:
            return self.Options.model_validate(options)
        except ValueError as e:
            raise ConfigError(f"invalid data.options for modality '{self.name}': {e}") from e

    # ---------------------------------------------------------------- reading
    @abstractmethod
    def load(self, data: Any, entry: Any | None, task: Any | None, seed: int) -> DataBundle:
        """Read a dataset (``data`` is a :class:`meddx.config.DataConfig`; ``entry`` its catalog
        entry or None for a user path) into a :class:`DataBundle` with train/val/calib/test."""

    @abstractmethod
    def read(self, source: Any, input_spec: dict[str, Any]) -> Sample:
        """Read one user input (path, bytes with a name, array, tensor, string, FHIR resource)
        and preprocess it exactly as training did (``input_spec`` from the model card).

        Raises:
            DataError: unreadable input. InputMismatchError: input that does not fit the model.
        """

    def group_uploads(self, uploads: list[dict[str, Any]]) -> list[Any]:
        """Sources for :meth:`read` from uploaded files (``{"name", "data"}`` each); the
        default reads each file as one input. A modality whose inputs span several files
        (a WFDB header and its signal) groups them here."""
        return list(uploads)

    def from_json(self, item: Any) -> Upload | Any:
        """One item of a JSON request body (the body itself, or one of its ``inputs``) → an
        :class:`Upload` (file bytes, checked like a multipart file) or a source for
        :meth:`read`. ``{"data": base64}`` and ``{"path": …}`` objects are handled by the
        service before this is called.

        The default passes objects and lists through and refuses text: a reader given a string
        would take it for a path on the server. A modality whose inputs are text (SMILES,
        DNA) overrides this.

        Raises:
            DataError: an input this modality does not take as JSON (hint: :attr:`input_hint`).
        """
        if isinstance(item, str):
            raise self.text_refused()
        return item

    def text_refused(self) -> DataError:
        """The error for a JSON text input this modality does not read."""
        article = "an" if self.name[:1] in "aeiou" else "a"
        return DataError(f"{article} {self.name} model does not take a text string as a "
                         "JSON input (file paths on the server are not read)",
                         hint=self.input_hint)

    def inspect_upload(self, upload: Upload) -> DeclaredSize:
        """Look at an upload's header before decoding it: refuse bytes that are not what the
        declared content type says, and say what the header declares (pixels, decoded bytes),
        for the service to compare with its caps. Nothing is decoded here. The default knows
        nothing about sizes.

        Raises:
            DataError: the bytes contradict the declared type, or the header is corrupt.
            PayloadTooLargeError: the header declares more than any reader could hold.
        """
        return DeclaredSize()

    def check_served(self, sample: Sample, input_spec: dict[str, Any],
                     pixels: int | None = None) -> None:
        """Refuse, in the service, an input that cannot be what the model was trained on
        (``pixels``: the size the upload's header declared, where known). Default: no check.

        Raises:
            DataError, InputMismatchError: with the reason.
        """
        return None

    def check_job_source(self, path: Path, input_spec: dict[str, Any],
                         options: dict[str, Any]) -> None:
        """Refuse, when a job is submitted, a file the modality cannot read (header only).

        Raises:
            DataError: with the reason (the service answers 422).
        """
        raise ConfigError(f"modality '{self.name}' takes no jobs")

    def read_job(self, path: Path, input_spec: dict[str, Any], options: dict[str, Any], *,
                 progress: Callable[[int, int], None] | None = None,
                 cancel: Any = None) -> Sample:
        """Read one large input on a job worker, reporting ``progress(done, total)`` and
        stopping when ``cancel`` (a ``threading.Event``) is set."""
        raise ConfigError(f"modality '{self.name}' takes no jobs")

    def fhir_report(self, prediction: Any, card: Any, *, heatmap_png: bytes | None = None,
                    subject: str | None = None, research_only: bool | None = None,
                    **context: Any) -> dict[str, Any] | None:
        """A FHIR Bundle reporting ``prediction`` as a DiagnosticReport (with the heat map
        attached), for modalities that report that way; None (the default): the service
        answers with a RiskAssessment (binary tasks) or :meth:`to_fhir`. ``context``: what
        the modality put in the sample's ``meta`` (e.g. the number of tiles read)."""
        return None

    def read_external(self, data: Path, input_spec: dict[str, Any], task: Any
                      ) -> tuple[list[Any], list[Any], list[str], dict[str, Any]]:
        """Cases from another source for ``meddx validate``: ``(inputs, targets, ids, info)``,
        read with the package's preprocessing. The default reads a labelled-files CSV
        (``path,label``, or a folder holding ``labels.csv``); unreadable cases are left out
        and counted by reason in ``info``; a modality with its own layout overrides this.
        Features the modality derives from each input (``Sample.meta["derived"]``) come back
        as ``info["derived"]``, one dict per case, to become the split's metadata."""
        import re
        from collections import Counter

        from meddx.errors import MeddxError
        from meddx.modalities.labelled import read_labels_csv

        csv = data / "labels.csv" if data.is_dir() else data
        if not csv.is_file():
            raise DataError("external data must be a CSV (path,label) or a folder holding "
                            "labels.csv", path=str(data))
        table = read_labels_csv(csv)
        root = csv.parent
        modality, spec = self, input_spec
        tensors: list[Any] = []
        targets: list[Any] = []
        ids: list[str] = []
        derived: list[dict[str, float]] = []
        left_out: Counter[str] = Counter()
        for row in table.itertuples(index=False):
            rel = str(row.path)
            path = Path(rel) if Path(rel).is_absolute() else root / rel
            try:
                target = task.encode(row.label, sample_id=str(row.path))
                sample = modality.read(path, spec)
            except MeddxError as e:
                left_out[re.sub(r"\s+", " ", e.message)[:80]] += 1
                logger.warning("external case %s left out: %s", row.path, e.message)
                continue
            tensors.append(sample.tensor)
            targets.append(target)
            ids.append(Path(str(row.path)).name)
            if "derived" in sample.meta:  # features the package fuses (ECG rhythm features)
                derived.append(sample.meta["derived"])
        info = {"source": str(csv), "format": "labels CSV",
                "left_out_cases": int(sum(left_out.values())),
                "left_out_by_reason": dict(left_out.most_common())}
        if derived:
            info["derived"] = derived
        return tensors, targets, ids, info

    def variant_effect(self, predictor: Any, variant: str) -> dict[str, Any]:
        """The effect of a sequence variant (``meddx predict --variant``); only sequence
        modalities have one."""
        raise ConfigError(f"--variant needs a DNA sequence model; this is a '{self.name}' model")

    @abstractmethod
    def item_tensor(self, item: Any, input_spec: dict[str, Any]) -> Any:
        """One stored split item → the model input (tensor, or what ``collate`` takes)."""

    def transforms(self, train: bool, input_spec: dict[str, Any], augment: Any
                   ) -> Callable[[Any], Any] | None:
        """Augmentations for training (``train=True``); None for evaluation."""
        return None

    def batch_transforms(self, input_spec: dict[str, Any], augment: Any
                         ) -> Callable[[Any], Any] | None:
        """Augmentations applied to a whole training batch at once (fast on CPU); None for none."""
        return None

    def contrastive_views(self, input_spec: dict[str, Any] | None
                          ) -> Callable[[Any], tuple[Any, Any]] | None:
        """Two random views of a batch for contrastive pretraining (``meddx pretrain``).

        ``input_spec`` None only asks whether the modality can make views (before its data is
        read): None comes back when it can.

        Raises:
            ConfigError: the modality has no contrastive views (the default).
        """
        raise ConfigError(f"pretraining supports image modalities; this dataset is "
                          f"'{self.name}' data",
                          hint="pretrain on an image dataset, e.g. --dataset breastmnist")

    def collate(self, batch: list[tuple[Any, Any]]) -> tuple[Any, torch.Tensor]:
        """Batch items; the default stacks tensors."""
        xs, ys = zip(*batch, strict=True)
        return torch.stack(list(xs)), torch.stack(list(ys))

    # ------------------------------------------------------------------ models
    @abstractmethod
    def default_network(self, task: Any, input_spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Registry name and options of the network to use when the config names none."""

    def network_spec(self, input_spec: dict[str, Any]) -> dict[str, Any]:
        """Arguments every network builder receives: ``spatial_dims``, ``in_channels``, ``size``."""
        return {
            "spatial_dims": input_spec.get("spatial_dims", 2),
            "in_channels": input_spec.get("channels", 1),
            "size": input_spec.get("size"),
        }

    # ------------------------------------------------------------ packaging
    def package_preprocessing(self, input_spec: dict[str, Any], root: Path) -> dict[str, Any]:
        """The preprocessing to store in the package being written at ``root``, after copying
        into ``root`` whatever else the model needs to read an input (a slide model's tile
        encoder), so that the package is one unit to copy, sign and serve. Called before the
        card and manifest are written; the default needs nothing beyond the weights."""
        return input_spec

    def loaded_preprocessing(self, input_spec: dict[str, Any], root: Path,
                             manifest: dict[str, str]) -> dict[str, Any]:
        """The preprocessing of a package loaded from ``root`` (files already checked against
        ``manifest``), with the parts it carries pointed at ``root``; the inverse of
        :meth:`package_preprocessing`. The default returns it unchanged."""
        return input_spec

    # ------------------------------------------------------------ explanation
    def explainer(self, model: torch.nn.Module, input_spec: dict[str, Any], **options: Any) -> Any:
        """An object with ``explain(sample, class_index=None)`` returning the attribution
        (same grid as the input) and ``plot(sample, attribution, path)`` writing a PNG."""
        raise ConfigError(f"modality '{self.name}' has no explainer yet")

    def explanation_map(self, sample: Any, attribution: Any, shape: tuple[int, int]
                        ) -> np.ndarray | None:
        """The explanation drawn as an ``(H, W)`` map in [0, 1] over the whole input, at
        ``shape`` (rows, columns): how a result writer overlays it on a picture of the input
        (a slide's low-resolution level). None when the modality has no such map."""
        return None

    # ------------------------------------------------------------------- FHIR
    def to_fhir(self, prediction: Any, card: Any) -> dict[str, Any]:
        """A FHIR R4 resource (as a dict) describing ``prediction``."""
        raise ConfigError(f"modality '{self.name}' has no FHIR mapping yet")
