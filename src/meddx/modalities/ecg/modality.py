"""ECG waveforms: WFDB / PhysioNet 2017 / CSV / FHIR SampledData in, rhythm diagnosis out.

Training reads a folder of WFDB records with a labels file (the PhysioNet 2017 layout:
``REFERENCE.csv`` of ``record,label``). Every record is preprocessed once (leads selected,
resampled to the model's rate, z-scored per lead) into a cache under
``meddx.catalog.cache_dir()/ecg`` (the bundled data are never written), since reading 6,822
``.mat`` files every epoch is slow. Training takes a random window of ``window_seconds`` from
each record (zero-padded when shorter), with ECG augmentations; evaluation takes the centre
window. At prediction time :meth:`ECGModality.read` cuts the whole record into overlapping
windows, ``Sample.tensor`` is (n_windows, leads, samples) with ``meta["windows"] = True``, and
:meth:`ECGModality.aggregate` averages the per-window probabilities.

Readers and preprocessing live in :mod:`meddx.modalities.ecg.io`, FHIR in
:mod:`meddx.modalities.ecg.fhir`, explanation in :mod:`meddx.modalities.ecg.explain`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from meddx.errors import ConfigError, DataError
from meddx.modalities.base import DataBundle, Modality, Sample, Split, carve_split
from meddx.modalities.ecg.explain import ECGExplainer, plot_ecg_explanation_for
from meddx.modalities.ecg.fhir import (
    is_observation,
    observation_to_record,
    record_to_observation,
    rhythm_observation,
)
from meddx.modalities.ecg.io import (
    ECGRecord,
    fit_length,
    from_array,
    preprocess,
    read_csv,
    read_wfdb,
    read_wfdb_upload,
    segment_beats,
    windows,
)

__all__ = ["ECGModality", "ECGAugment", "CenterCrop", "aggregate_windows", "segment_beats",
           "record_to_observation", "read_source"]

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


class ECGAugment:
    """Training transform: a random window (time shift) of ``length`` samples, then amplitude
    scaling (×U(1-scale, 1+scale) per lead), baseline wander (a 0.05-0.5 Hz sine of amplitude
    up to ``baseline_wander``, half the time) and Gaussian noise (σ up to ``noise``, half the
    time). Amplitudes are in z-score units."""

    def __init__(self, length: int, fs: float, scale: float = 0.2, baseline_wander: float = 0.2,
                 noise: float = 0.05, enabled: bool = True) -> None:
        self.length, self.fs = length, fs
        self.scale, self.baseline_wander, self.noise = scale, baseline_wander, noise
        self.enabled = enabled

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c, n = x.shape
        room = abs(n - self.length)
        start = int(torch.randint(0, room + 1, (1,))) if room else 0
        x = torch.from_numpy(fit_length(x.numpy(), self.length, start=start)).clone()
        if not self.enabled:
            return x
        if self.scale:
            x *= 1 + self.scale * (2 * torch.rand(c, 1) - 1)
        if self.baseline_wander and torch.rand(1) < 0.5:
            t = torch.arange(self.length, dtype=torch.float32) / self.fs
            freq = 0.05 + 0.45 * torch.rand(c, 1)
            phase = 2 * torch.pi * torch.rand(c, 1)
            amp = self.baseline_wander * torch.rand(c, 1)
            x += amp * torch.sin(2 * torch.pi * freq * t + phase)
        if self.noise and torch.rand(1) < 0.5:
            x += self.noise * torch.rand(1) * torch.randn_like(x)
        return x


class CenterCrop:
    """Evaluation transform: the centre ``length`` samples (zero-padded when shorter)."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(fit_length(x.numpy(), self.length)))


def aggregate_windows(probs: np.ndarray) -> np.ndarray:
    """Per-window probabilities (n_windows, K) → the record's (K,): their mean."""
    p = np.asarray(probs, dtype=np.float64)
    return p.mean(axis=0) if p.ndim == 2 else p


def read_source(source: Any, input_spec: dict[str, Any]) -> tuple[ECGRecord, dict[str, Any]]:
    """Any supported ECG source → an :class:`ECGRecord` (before preprocessing) and notes.

    Sources: a WFDB path (``.hea``/``.mat``/``.dat``), a CSV path (rate from
    ``{"path": …, "fs": …}``, ``input_spec["input_fs"]`` or a ``# fs=…`` line), a FHIR
    Observation (dict, or a ``.json`` path), uploaded WFDB files ``{"x.hea": bytes, …}``,
    ``{"data": array, "fs": …, "leads": […]}``, an :class:`ECGRecord`, or an array/tensor
    (leads, samples), taken to be at the model's rate.
    """
    notes: dict[str, Any] = {}
    if isinstance(source, ECGRecord):
        return source, notes
    if is_observation(source):
        return observation_to_record(source), notes
    if isinstance(source, dict):
        if any(str(k).lower().endswith(".hea") for k in source):
            return read_wfdb_upload(source), notes
        fs = source.get("fs")
        if isinstance(source.get("data"), bytes | bytearray):  # one uploaded file
            return _read_upload(source, fs or input_spec.get("input_fs")), notes
        if "path" in source:
            return _read_path(Path(source["path"]), fs or input_spec.get("input_fs")), notes
        if "data" in source:
            return from_array(source["data"], fs, source.get("leads"),
                              str(source.get("id", "array"))), notes
        raise DataError("an ECG given as a dict needs 'path', 'data', WFDB files or a FHIR "
                        "Observation", hint=f"got keys {sorted(map(str, source))}")
    if isinstance(source, str | Path):
        return _read_path(Path(source), input_spec.get("input_fs")), notes
    if isinstance(source, np.ndarray | torch.Tensor):
        arr = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else source
        notes["assumed_fs"] = input_spec.get("fs")
        leads = input_spec.get("leads")
        n_leads = 1 if np.ndim(arr) == 1 else np.shape(arr)[0]
        names = leads if leads and len(leads) == n_leads else None
        return from_array(arr, input_spec.get("fs"), names), notes
    raise DataError(f"cannot read an ECG from a {type(source).__name__}",
                    hint="give a WFDB .hea/.mat, a CSV, a FHIR Observation or an array")


def _read_upload(source: dict[str, Any], fs: float | None) -> ECGRecord:
    """One uploaded file that is a whole ECG: a CSV or a FHIR Observation (``.json``). A WFDB
    signal file alone is refused: its header says how to read it."""
    name = str(source.get("name") or "upload")
    suffix = Path(name).suffix.lower()
    data = bytes(source["data"])
    if suffix in (".csv", ".txt"):
        with tempfile.TemporaryDirectory(prefix="meddx-ecg-") as tmp:
            p = Path(tmp) / "upload.csv"  # never the client's name (it may name a patient)
            p.write_bytes(data)
            return read_csv(p, fs)
    if suffix == ".json" or data.lstrip()[:1] == b"{":
        try:
            resource = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise DataError(f"uploaded {suffix or 'file'} is not valid JSON") from e
        if not is_observation(resource):
            raise DataError("uploaded JSON is not a FHIR Observation",
                            hint="send an Observation with valueSampledData or component[]")
        return observation_to_record(resource, record_id="upload")
    if suffix in (".mat", ".dat"):
        raise DataError(f"a WFDB signal file ({suffix}) was uploaded without its .hea header",
                        hint="upload the header and the signal file together")
    raise DataError(f"cannot tell what ECG format the uploaded file{' ' + suffix if suffix else ''}"
                    " is", hint="upload a WFDB .hea with its .mat/.dat, a CSV (with a '# fs=…' "
                    "line) or a FHIR Observation (.json)")


def _read_path(path: Path, fs: float | None) -> ECGRecord:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_csv(path, fs)
    if suffix == ".json":
        try:
            resource = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read FHIR JSON: {e}", path=str(path)) from e
        if not is_observation(resource):
            raise DataError("JSON file is not a FHIR Observation", path=str(path))
        return observation_to_record(resource, record_id=path.stem)
    return read_wfdb(path)


class ECGModality(Modality):
    """ECG waveforms (registry key ``ecg``)."""

    name = "ecg"
    input_hint = ('send a FHIR Observation (SampledData), {"data": [[…]], "fs": …}, or the '
                  "WFDB/CSV files as multipart/form-data")

    class Options(BaseModel):
        """``data.options`` for ECG datasets (catalog options are merged first).

        Args:
            format: ``physionet2017`` / ``wfdb``: a folder of WFDB records + labels file.
            labels_file: ``record,label`` CSV inside the folder (no header or a header).
            split_lists: name of saved record lists ``meddx/modalities/ecg/splits/<name>_<split>.txt``;
                without it, splits are random (stratified) by ``val_fraction``/``test_fraction``.
            leads: lead names the model takes, in order (None: all leads of the first record).
            fs: the model's sampling rate (records are resampled to it).
            window_seconds: the network's input length.
            stride_seconds: step between prediction windows.
            min_seconds: shorter records are refused.
            cache: preprocess the whole dataset once into ``cache_dir()/ecg``.
            rhythm_features: compute each record's RR-interval, HRV and beat-morphology
                features (:mod:`meddx.modalities.ecg.rhythm`) from the record at its own rate,
                and fuse them with the network's logits on calib (late fusion, as side inputs
                are); prediction computes them from the input itself.
            scale / baseline_wander / noise: augmentation strengths (z-score units).
        """

        model_config = ConfigDict(frozen=True, extra="forbid")

        format: Literal["physionet2017", "wfdb"] = "wfdb"
        labels_file: str = "REFERENCE.csv"
        split_lists: str | None = None
        leads: list[str] | None = None
        fs: float = Field(150.0, gt=0)
        window_seconds: float = Field(30.0, gt=0)
        stride_seconds: float = Field(15.0, gt=0)
        min_seconds: float = Field(5.0, ge=0)
        cache: bool = True
        rhythm_features: bool = False
        scale: float = Field(0.2, ge=0, lt=1)
        baseline_wander: float = Field(0.2, ge=0)
        noise: float = Field(0.05, ge=0)

    def __init__(self) -> None:
        self._length: int | None = None

    # ---------------------------------------------------------------- reading
    def load(self, data: Any, entry: Any | None, task: Any | None, seed: int) -> DataBundle:
        """Read a labelled WFDB folder into train/val/calib/test (calib carved from train)."""
        opts = self.parse_options({**(entry.options if entry else {}), **dict(data.options)})
        folder, name = self._folder(data, entry)
        ids, raw = _read_labels(folder / opts.labels_file)
        task = task or (entry.task if entry else None)
        if task is None:
            from meddx.tasks import TaskSpec

            task = TaskSpec.from_labels("multiclass", raw)
        targets = {i: task.encode(r, sample_id=i) for i, r in zip(ids, raw, strict=True)}
        split_ids = self._split_ids(ids, targets, opts, data, seed)
        if data.limit:
            split_ids = {k: _limit(v, targets, data.limit, seed) for k, v in split_ids.items()}
        spec = self._input_spec(opts, folder / split_ids["train"][0])
        needed = sorted({i for v in split_ids.values() for i in v})
        signals = (_cached_signals(folder, name, ids, spec) if opts.cache
                   else {i: preprocess(read_wfdb(folder / i), spec) for i in needed})
        rhythm = None
        if opts.rhythm_features:
            from meddx.modalities.ecg.rhythm import cached_features, columns

            rhythm = dict(zip(needed, cached_features(folder, needed), strict=True))
            spec["derived_features"] = columns()
        splits = {k: _make_split(k, v, signals, targets, spec["fs"], rhythm)
                  for k, v in split_ids.items()}
        strat = task.target_index(splits["train"].targets) if task.kind != "regression" else None
        splits["train"], splits["calib"] = carve_split(
            splits["train"], data.calib_fraction, seed, strat, "calib")
        self._length = spec["length"]
        info = {"source": str(folder), "records": len(needed),
                "split": opts.split_lists or "random stratified",
                "license": entry.license if entry else "unknown",
                "citation": entry.citation if entry else ""}
        bundle = DataBundle(dataset=name, modality=self.name, task=task,
                            splits={k: splits[k] for k in ("train", "val", "calib", "test")},
                            input_spec=spec, info=info)
        logger.info("loaded %s: %s", name, bundle.summary()["splits"])
        return bundle

    @staticmethod
    def _folder(data: Any, entry: Any | None) -> tuple[Path, str]:
        if entry is not None:
            from meddx.catalog import resolve

            return resolve(entry)[0].parent, entry.name
        if not data.path:
            raise ConfigError("ECG data needs a catalog dataset or data.path (a WFDB folder)")
        folder = Path(data.path)
        if not folder.is_dir():
            raise DataError("ECG data folder not found", path=str(folder))
        return folder, folder.name

    @staticmethod
    def _split_ids(ids: list[str], targets: dict[str, Any], opts: Any, data: Any,
                   seed: int) -> dict[str, list[str]]:
        if opts.split_lists:
            known = set(ids)
            out = {}
            for split in ("train", "val", "test"):
                listed = _split_list(opts.split_lists, split)
                missing = [i for i in listed if i not in known]
                if missing:
                    raise DataError(f"{len(missing)} records of the saved {split} split are not "
                                    f"in the labels file (first: {missing[0]})",
                                    hint="the dataset folder is incomplete or a different version")
                out[split] = listed
            return out
        y = np.array([int(np.asarray(targets[i]).reshape(-1)[0]) for i in ids])
        everything = Split("all", list(ids), y, list(ids))
        rest, test = carve_split(everything, data.test_fraction, seed, y, "test")
        frac = data.val_fraction / (1 - data.test_fraction)
        train, val = carve_split(rest, frac, seed, rest.targets, "val")
        return {"train": train.ids, "val": val.ids, "test": test.ids}

    @staticmethod
    def _input_spec(opts: Any, first_record: Path) -> dict[str, Any]:
        leads = list(opts.leads) if opts.leads else read_wfdb(first_record).leads
        fs = float(opts.fs)
        return {
            "modality": "ecg", "spatial_dims": 1, "channels": len(leads), "leads": leads,
            "fs": fs, "length": int(round(opts.window_seconds * fs)),
            "stride": int(round(opts.stride_seconds * fs)), "min_seconds": opts.min_seconds,
            "normalize": "zscore", "resample": "scipy.signal.resample_poly",
            "aggregate": "mean",
            "augment": {"scale": opts.scale, "baseline_wander": opts.baseline_wander,
                        "noise": opts.noise},
        }

    def group_uploads(self, uploads: list[dict[str, Any]]) -> list[Any]:
        """A WFDB header and its signal files are one input: grouped by record name
        (``{"A00001.hea": …, "A00001.mat": …}`` per record); other files one input each."""
        if not any(str(u.get("name") or "").lower().endswith(".hea") for u in uploads):
            return list(uploads)
        records: dict[str, dict[str, bytes]] = {}
        for u in uploads:
            name = Path(u.get("name") or "upload").name
            records.setdefault(name.split(".")[0], {})[name] = u["data"]
        return list(records.values())

    def read(self, source: Any, input_spec: dict[str, Any]) -> Sample:
        """Read and preprocess one ECG exactly as in training, cut into windows.

        Returns a Sample whose tensor is (n_windows, leads, length) with ``meta["windows"]``
        True and ``meta["starts"]`` (window start samples); aggregate per-window probabilities
        with :meth:`aggregate`.
        """
        record, notes = read_source(source, input_spec)
        sig = preprocess(record, input_spec)
        derived = None
        if input_spec.get("derived_features"):  # a package fused with rhythm features
            from meddx.modalities.ecg.rhythm import record_features

            derived = record_features(record, input_spec.get("leads"))
        length = int(input_spec["length"])
        wins, starts = windows(sig, length, int(input_spec.get("stride", length)))
        meta = {"windows": True, "starts": starts, "fs": float(input_spec["fs"]),
                "n_samples": int(sig.shape[-1]), "source_fs": record.fs,
                "leads": list(input_spec.get("leads") or record.leads),
                "seconds": round(record.seconds, 3), "signal": sig, **notes}
        if derived is not None:
            meta["derived"] = derived
        return Sample(id=record.id, tensor=torch.from_numpy(np.ascontiguousarray(wins)), meta=meta)

    def aggregate(self, probs: np.ndarray) -> np.ndarray:
        """Per-window probabilities (n_windows, K) → record probabilities (K,) (the mean)."""
        return aggregate_windows(probs)

    def aggregate_logits(self, logits: np.ndarray, task: Any = None) -> np.ndarray:
        """Per-window logits (n_windows, K) → one record's logits (K,) whose activation gives
        the mean of the per-window probabilities (softmax for K > 1, sigmoid for one logit;
        ``task`` makes it exact for multilabel (sigmoid) and ordinal (mean logit) tasks)."""
        z = np.asarray(logits, dtype=np.float64)
        if z.ndim == 1:
            return z.astype(np.float32)
        kind = getattr(task, "kind", None) or ("binary" if z.shape[1] == 1 else "multiclass")
        eps = 1e-7
        if kind in ("binary", "multilabel"):
            p = np.clip((1 / (1 + np.exp(-z))).mean(axis=0), eps, 1 - eps)
            return np.log(p / (1 - p)).astype(np.float32)
        if kind == "multiclass":
            e = np.exp(z - z.max(axis=1, keepdims=True))
            p = (e / e.sum(axis=1, keepdims=True)).mean(axis=0)
            return np.log(np.clip(p, eps, 1)).astype(np.float32)
        return z.mean(axis=0).astype(np.float32)

    def item_tensor(self, item: Any, input_spec: dict[str, Any]) -> torch.Tensor:
        """A stored record (leads, samples) → float tensor of the whole record (the transform
        or :meth:`collate` cuts the window)."""
        # collate() gets no spec: remember the window length here (SplitDataset calls this
        # on the same instance that collates)
        self._length = int(input_spec["length"])
        if isinstance(item, str | Path):
            item = preprocess(read_wfdb(item), input_spec)
        return torch.from_numpy(np.array(item, dtype=np.float32, copy=True))

    def transforms(self, train: bool, input_spec: dict[str, Any], augment: Any) -> Any:
        """Random window + augmentations for training; the centre window for evaluation."""
        length = int(input_spec["length"])
        self._length = length
        if not train:
            return CenterCrop(length)
        a = input_spec.get("augment", {})
        enabled = bool(getattr(augment, "enabled", True)) if augment is not None else True
        noise = max(float(a.get("noise", 0.05)), float(getattr(augment, "noise", 0.0) or 0.0))
        return ECGAugment(length, float(input_spec["fs"]), scale=float(a.get("scale", 0.2)),
                          baseline_wander=float(a.get("baseline_wander", 0.2)), noise=noise,
                          enabled=enabled)

    def collate(self, batch: list[tuple[Any, Any]]) -> tuple[Any, torch.Tensor]:
        """Stack records, centre-cropping/padding any that are not window-length yet."""
        xs, ys = zip(*batch, strict=True)
        length = self._length or max(x.shape[-1] for x in xs)
        xs = [x if x.shape[-1] == length else CenterCrop(length)(x) for x in xs]
        return torch.stack(xs), torch.stack(list(ys))

    def windows_of(self, item: Any, input_spec: dict[str, Any]) -> torch.Tensor:
        """A stored record → its prediction windows (n_windows, leads, length), as ``read``."""
        sig = self.item_tensor(item, input_spec).numpy()
        length = int(input_spec["length"])
        wins, _ = windows(sig, length, int(input_spec.get("stride", length)))
        return torch.from_numpy(np.ascontiguousarray(wins))

    # ------------------------------------------------------------------ models
    def default_network(self, task: Any, input_spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        # stride 4 + max-pool: the stem leaves 1/8 of the input rate (affordable on 2 cores)
        return "resnet1d", {"layers": [2, 2, 2, 2], "widths": [32, 64, 128, 256],
                            "stem_kernel": 15, "stem_stride": 4, "dropout": 0.2}

    def network_spec(self, input_spec: dict[str, Any]) -> dict[str, Any]:
        return {"spatial_dims": 1, "in_channels": int(input_spec.get("channels", 1)),
                "size": None, "length": int(input_spec["length"])}

    # ------------------------------------------------------------ explanation
    def explainer(self, model: torch.nn.Module, input_spec: dict[str, Any],
                  **options: Any) -> ECGExplainer:
        """Integrated gradients (captum) by default; ``method="gradcam"`` for 1D Grad-CAM.
        Options: ``task``, ``network``, ``layer``, ``n_steps`` (see :class:`ECGExplainer`)."""
        return ECGExplainer(model, input_spec, **options)

    def plot_explanation(self, sample: Sample, attribution: np.ndarray, path: str | Path,
                         title: str | None = None) -> Path:
        """Write the trace with its attribution heat strip beneath (PNG) for a read Sample."""
        return plot_ecg_explanation_for(sample, attribution, path, title)

    # ------------------------------------------------------------------- FHIR
    def to_fhir(self, prediction: Any, card: Any) -> dict[str, Any]:
        """The rhythm interpretation as an R4B Observation dict (LOINC 8884-9)."""
        return rhythm_observation(prediction, card)


# ------------------------------------------------------------------- helpers
def _read_labels(path: Path) -> tuple[list[str], list[str]]:
    if not path.is_file():
        raise DataError("labels file not found", path=str(path),
                        hint="a CSV of record,label lines (PhysioNet's REFERENCE.csv)")
    df = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
    if df.shape[1] < 2:
        raise DataError("labels file needs two columns: record,label", path=str(path))
    if df.iloc[0, 0].strip().lower() in ("record", "id", "name"):
        df = df.iloc[1:]
    ids = [s.strip() for s in df.iloc[:, 0]]
    if len(set(ids)) != len(ids):
        raise DataError("labels file lists a record twice", path=str(path))
    return ids, [s.strip() for s in df.iloc[:, 1]]


def _split_list(name: str, split: str) -> list[str]:
    f = resources.files(__package__).joinpath("splits", f"{name}_{split}.txt")
    if not f.is_file():
        raise ConfigError(f"no saved split list {name}_{split}.txt")
    return [ln.strip() for ln in f.read_text().splitlines() if ln.strip()]


def _limit(ids: list[str], targets: dict[str, Any], n: int, seed: int) -> list[str]:
    if len(ids) <= n:
        return ids
    from sklearn.model_selection import train_test_split

    y = np.array([int(np.asarray(targets[i]).reshape(-1)[0]) for i in ids])
    counts = np.bincount(y)
    strat = y if n >= len(counts) and (counts[counts > 0] >= 2).all() else None
    try:
        keep, _ = train_test_split(np.arange(len(ids)), train_size=n, random_state=seed,
                                   stratify=strat)
    except ValueError:
        keep, _ = train_test_split(np.arange(len(ids)), train_size=n, random_state=seed)
    return [ids[i] for i in sorted(keep)]


def _make_split(name: str, ids: list[str], signals: dict[str, np.ndarray],
                targets: dict[str, Any], fs: float,
                rhythm: dict[str, np.ndarray] | None = None) -> Split:
    inputs = [signals[i] for i in ids]
    meta = pd.DataFrame({"seconds": [round(s.shape[-1] / fs, 2) for s in inputs]})
    if rhythm is not None:
        from meddx.modalities.ecg.rhythm import columns

        meta = pd.concat([meta, pd.DataFrame(np.stack([rhythm[i] for i in ids]) if ids else
                                             np.zeros((0, len(columns()))), columns=columns())],
                         axis=1)
    return Split(name=name, inputs=inputs, targets=np.asarray([targets[i] for i in ids]),
                 ids=list(ids), metadata=meta)


def _cache_key(folder: Path, ids: list[str], spec: dict[str, Any]) -> str:
    keyed = {k: spec[k] for k in ("leads", "fs", "min_seconds", "normalize", "resample")}
    raw = json.dumps({"v": CACHE_VERSION, "folder": str(folder.resolve()), "ids": ids, **keyed},
                     sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _cached_signals(folder: Path, name: str, ids: list[str],
                    spec: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every record preprocessed once into ``cache_dir()/ecg/<name>-<key>/`` (float32
    ``signals.npy`` (leads, total samples) + ``offsets.npy``), memory-mapped on later runs."""
    from meddx.catalog import cache_dir

    target = cache_dir() / "ecg" / f"{name}-{_cache_key(folder, ids, spec)}"
    if not (target / "offsets.npy").is_file():
        _build_cache(folder, ids, spec, target)
    signals = np.load(target / "signals.npy", mmap_mode="r")
    offsets = np.load(target / "offsets.npy")
    cached_ids = json.loads((target / "ids.json").read_text())
    return {i: signals[:, offsets[k]:offsets[k + 1]] for k, i in enumerate(cached_ids)}


def _build_cache(folder: Path, ids: list[str], spec: dict[str, Any], target: Path) -> None:
    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("preprocessing %d ECG records once into %s", len(ids), target)
    parts, offsets = [], [0]
    for i in tqdm(ids, desc=f"caching {folder.name} ECGs", unit="rec", mininterval=2.0):
        sig = preprocess(read_wfdb(folder / i), spec)
        parts.append(sig)
        offsets.append(offsets[-1] + sig.shape[-1])
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        np.save(tmp / "signals.npy", np.concatenate(parts, axis=1))
        np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
        (tmp / "ids.json").write_text(json.dumps(ids))
        os.replace(tmp, target)
    except OSError:
        if not (target / "offsets.npy").is_file():  # another process did not win the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
