"""Archive inference on Ray Data: a model over 10⁵–10⁶ stored inputs, exactly once, resumable.

The pipeline streams blocks of inputs (Ray Data's batch-inference pattern)::

    list inputs ─► skip ids already written ─► blocks of N ids (named by a hash of their ids)
      ─► read + preprocess   (the model's Modality.read, nothing else: an actor pool of
                              readers, each importing the modality once, or Ray tasks where
                              each input is minutes of work, as a slide is)
      ─► predict + write     (an actor pool: each actor loads and verifies the package once,
                              predicts the block and writes it as one Parquet part)

Exactly once: a part is written to a temporary name and renamed into place (atomic on one
file system), and its name depends only on the ids it holds, so a retried block replaces its
own part with the same rows instead of adding a second copy. A rerun (or the next attempt
after a lost node) reads the ids of the parts already there and runs only the rest. An input
that cannot be read or predicted is a row with its ``error``; it is never dropped.

The results are a Parquet dataset directory (``results.parquet/part-*.parquet`` plus
``_job.json``); pandas, pyarrow, DuckDB and Spark read the directory as one table.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from meddx.cluster.sources import InputRef
from meddx.errors import ConfigError, MeddxError, ModelError

__all__ = ["ArchiveConfig", "ArchiveResult", "done_ids", "plan_blocks", "run_archive",
           "read_block", "BlockReader", "BlockPredictor", "encode_tensor", "decode_tensor"]

logger = logging.getLogger(__name__)
JOB_FILE = "_job.json"


class ArchiveConfig(BaseModel):
    """One archive job: the model, where the results go and how the work is spread."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: Path
    out: Path
    backend: str = "auto"
    operating_point: str | None = None
    block_size: int = Field(64, ge=1, description="inputs per block (one Parquet part)")
    workers: int = Field(1, ge=1, description="predicting actors")
    threads: int = Field(1, ge=1, description="torch threads per actor")
    worker_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves per actor")
    read_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves per reader")
    readers: int | None = Field(None, ge=1, description="reading actors (long-lived: the "
                                "modality and torch are imported once per actor); None: a Ray "
                                "task per block, for blocks of minutes each (slides)")
    read_memory_mb: int = Field(256, ge=1, description="memory Ray reserves per read task")
    attempts: int = Field(3, ge=1, description="runs over the remaining inputs when the "
                          "cluster loses work (a node dies)")


class ArchiveResult(BaseModel):
    """What a job did: inputs listed, skipped as already written, written now, errors."""

    model_config = ConfigDict(frozen=True)

    listed: int
    skipped: int
    written: int
    errors: int
    attempts: int
    out: str


# ------------------------------------------------------------------ the output directory
def _parts(out: Path) -> list[Path]:
    return sorted(out.glob("part-*.parquet")) if out.is_dir() else []


def done_ids(out: Path) -> set[str]:
    """Ids already in the results directory ``out`` (unfinished temporary parts ignored)."""
    import pyarrow.parquet as pq

    ids: set[str] = set()
    for part in _parts(out):
        ids.update(pq.read_table(part, columns=["id"]).column("id").to_pylist())
    return ids


def _open_out(out: Path, sha256: str, model: Path) -> None:
    """Create ``out`` or check that its rows came from this very package."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out.name} exists and is not a results directory",
                          hint="archive results are a Parquet dataset directory; pick a new "
                          "name", path=str(out))
    out.mkdir(parents=True, exist_ok=True)
    job = out / JOB_FILE
    if job.exists():
        have = json.loads(job.read_text()).get("model_sha256")
        if have != sha256:
            raise ConfigError("these results were written by another model package; resuming "
                              "would mix two models' rows", path=str(out),
                              hint="write to a new --out directory")
    else:
        job.write_text(json.dumps({"model_sha256": sha256, "model": model.name}, indent=2))
    for stale in out.glob(".part-*.tmp*"):  # a writer killed mid-write
        stale.unlink(missing_ok=True)


def plan_blocks(refs: list[InputRef], skip: set[str], size: int) -> list[dict[str, Any]]:
    """Blocks of the inputs not yet written; a block's part name is a hash of its ids."""
    pending = [r for r in refs if r.id not in skip]
    blocks = []
    for start in range(0, len(pending), size):
        chunk = pending[start : start + size]
        ids = [r.id for r in chunk]
        digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:20]
        blocks.append({"part": f"part-{digest}", "ids": ids,
                       "sources": [json.dumps(_plain(r.source)) for r in chunk]})
    return blocks


def _plain(source: Any) -> Any:
    return str(source) if isinstance(source, Path) else source


# ------------------------------------------------------------------ stage 1: read
def encode_tensor(tensor: Any) -> bytes:
    """A sample's model input as bytes between the read tasks and the actors: arrays as
    ``.npy`` (b"N"), anything else a modality reads into (a slide's bag of tile embeddings)
    with Ray's own serialiser (b"P"; it never leaves this job's processes)."""
    if hasattr(tensor, "numpy") or isinstance(tensor, np.ndarray):
        buf = io.BytesIO()
        array = tensor.numpy() if hasattr(tensor, "numpy") else tensor
        np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
        return b"N" + buf.getvalue()
    import ray.cloudpickle as cloudpickle

    return b"P" + cloudpickle.dumps(tensor)


def decode_tensor(blob: bytes) -> Any:
    """The inverse of :func:`encode_tensor`."""
    import torch

    if blob[:1] == b"N":
        return torch.from_numpy(np.load(io.BytesIO(blob[1:]), allow_pickle=False))
    import ray.cloudpickle as cloudpickle

    return cloudpickle.loads(blob[1:])


def _small_meta(meta: dict[str, Any]) -> str:
    keep = {}
    for k, v in meta.items():
        try:
            text = json.dumps(v)
        except (TypeError, ValueError):
            continue
        if len(text) < 2000:
            keep[k] = v
    return json.dumps(keep)


def read_block(row: dict[str, Any], modality: str, preprocessing: dict[str, Any]
               ) -> dict[str, Any]:
    """Read and preprocess one block's inputs through the Modality contract (a Ray task)."""
    from meddx.modalities import get_modality

    reader = get_modality(modality)
    tensors, errors, metas = [], [], []
    for raw in row["sources"]:
        try:
            sample = reader.read(json.loads(raw), preprocessing)
            tensors.append(encode_tensor(sample.tensor))
            errors.append("")
            metas.append(_small_meta(sample.meta))
        except MeddxError as e:
            tensors.append(b"")
            errors.append(str(e) or type(e).__name__)
            metas.append("{}")
        except Exception as e:  # noqa: BLE001 - one bad file must not cost its block
            logger.warning("reader failed on an input of block %s: %s", row["part"],
                           type(e).__name__)
            tensors.append(b"")
            errors.append(f"{type(e).__name__}: unreadable input")
            metas.append("{}")
    return {"part": row["part"], "ids": list(row["ids"]), "tensors": tensors,
            "errors": errors, "metas": metas}


class BlockReader:
    """A Ray Data actor that reads blocks (:func:`read_block`) for the whole job.

    A Ray task that reads runs in a worker process which imports torch and the modality
    first (~5 s of CPU), and Ray stops idle workers beyond a node's CPU count, so a short read
    task often pays that start again. An actor pays it once.
    """

    def __init__(self, modality: str, preprocessing: dict[str, Any]) -> None:
        from meddx.modalities import get_modality

        get_modality(modality)  # import torch and the modality now, not in the first block
        self.modality, self.preprocessing = modality, preprocessing

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return read_block(row, self.modality, self.preprocessing)


# ------------------------------------------------------------------ stage 2: predict + write
def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):  # multilabel decision: the labels decided present
        return "|".join(k for k, v in value.items() if v)
    return "|".join(map(str, value)) if isinstance(value, list) else str(value)


def prediction_row(p: Any) -> dict[str, Any]:
    """One Parquet row of a prediction: the columns of ``meddx predict``'s CSV, named alike
    (the decision first), with the probabilities as maps of class → value."""
    return {
        "id": p.id,
        "decision": _text(p.decision),
        "operating_point": p.operating_point,
        "threshold": p.threshold,
        "most_likely_class": _text(p.label),
        "probabilities": dict(p.probabilities),
        "calibrated": dict(p.calibrated) if p.calibrated else None,
        "risk": p.risk,
        "conformal_set": list(p.prediction_set) if p.prediction_set is not None else None,
        "refer": bool(p.refer),
        "review": bool(p.review),
        "ood": p.ood,
        "ood_score": p.ood_score,
        "model_sha256": p.model.get("sha256"),
        "error": None,
    }


def _schema() -> Any:
    import pyarrow as pa

    probs = pa.map_(pa.string(), pa.float64())
    return pa.schema([
        ("id", pa.string()), ("decision", pa.string()), ("operating_point", pa.string()),
        ("threshold", pa.float64()), ("most_likely_class", pa.string()),
        ("probabilities", probs), ("calibrated", probs), ("risk", pa.float64()),
        ("conformal_set", pa.list_(pa.string())), ("refer", pa.bool_()),
        ("review", pa.bool_()), ("ood", pa.bool_()), ("ood_score", pa.float64()),
        ("model_sha256", pa.string()), ("error", pa.string()),
    ])


def write_part(out: Path, part: str, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` as ``out/part.parquet``: a temporary file first, then an atomic rename."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=_schema())
    final = out / f"{part}.parquet"
    tmp = out / f".{part}.tmp-{uuid.uuid4().hex}"
    pq.write_table(table, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    return final


class BlockPredictor:
    """A Ray Data actor: loads and verifies the package once, then predicts and writes blocks.

    Args:
        model: the package folder (on storage every node sees).
        sha256: the package hash the driver verified; an actor that loads anything else stops.
        out: the results directory (shared storage).
        backend, operating_point, threads: as ``meddx predict``.
    """

    def __init__(self, model: str, sha256: str, out: str, backend: str,
                 operating_point: str | None, threads: int) -> None:
        from meddx.inference import load_model

        self.predictor = load_model(model, backend=backend, threads=threads,
                                    operating_point=operating_point)
        if self.predictor.package.sha256 != sha256:
            raise ModelError("the package on this node differs from the one the job started "
                             "with", hint="put the package on storage all nodes share",
                             path=model)
        self.out = Path(out)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        rows = self.predict_block(row)
        write_part(self.out, row["part"], rows)
        errors = sum(r["error"] is not None for r in rows)
        return {"part": row["part"], "rows": len(rows), "errors": errors}

    def predict_block(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """Rows for one read block, in its input order; failures become error rows."""
        from meddx.modalities.base import Sample

        samples, out = [], {}
        for sid, blob, err, meta in zip(row["ids"], row["tensors"], row["errors"],
                                        row["metas"], strict=True):
            if err:
                out[sid] = _error_row(sid, err)
                continue
            samples.append(Sample(id=sid, tensor=decode_tensor(blob), meta=json.loads(meta)))
        for p in self._predict(samples, out):
            out[p.id] = prediction_row(p)
        return [out[sid] for sid in row["ids"]]

    def _predict(self, samples: list[Any], out: dict[str, Any]) -> list[Any]:
        if not samples:
            return []
        try:
            return self.predictor.predict_samples(samples, batch_size=len(samples))
        except MeddxError:  # one misfit input spoils a batch: find it, keep the others
            preds = []
            for s in samples:
                try:
                    preds += self.predictor.predict_samples([s])
                except MeddxError as e:
                    out[s.id] = _error_row(s.id, str(e))
            return preds


def _error_row(sid: str, error: str) -> dict[str, Any]:
    row = dict.fromkeys(_schema().names)
    row.update(id=sid, error=error, refer=False, review=False)
    return row


# ------------------------------------------------------------------ the driver
def _pipeline(ray: Any, cfg: ArchiveConfig, blocks: list[dict[str, Any]], sha256: str,
              card: Any) -> Iterator[dict[str, Any]]:
    # the command draws its own bar; Ray's per-operator bars would redraw from the driver's
    # core. Off for this job only: the caller's own Ray Data use keeps its settings.
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.enable_operator_progress_bars
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = False
    try:
        yield from _datasets(ray, cfg, blocks, sha256, card).iter_rows()
    finally:
        ctx.enable_progress_bars, ctx.enable_operator_progress_bars = saved


def _datasets(ray: Any, cfg: ArchiveConfig, blocks: list[dict[str, Any]], sha256: str,
              card: Any) -> Any:
    """The job's Ray Data pipeline: blocks → read → predict and write."""
    ds = ray.data.from_items(blocks, override_num_blocks=len(blocks))
    # the reads reserve memory for decoding; as a requirement the actors do not share, it
    # also keeps Ray Data from fusing the reads into the actors, so decoding scales on CPU
    # tasks apart from the (possibly GPU) predictors
    read_args = {"modality": card.modality, "preprocessing": dict(card.preprocessing)}
    if cfg.readers:
        ds = ds.map(BlockReader, num_cpus=cfg.read_cpus, memory=cfg.read_memory_mb * 2**20,
                    compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.readers),
                    fn_constructor_kwargs=read_args)
    else:
        ds = ds.map(read_block, num_cpus=cfg.read_cpus, memory=cfg.read_memory_mb * 2**20,
                    fn_kwargs=read_args)
    ds = ds.map(BlockPredictor, num_cpus=cfg.worker_cpus,
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.workers),
                fn_constructor_kwargs={
                    "model": str(cfg.model.resolve()), "sha256": sha256,
                    "out": str(cfg.out.resolve()), "backend": cfg.backend,
                    "operating_point": cfg.operating_point, "threads": cfg.threads})
    return ds


def run_archive(cfg: ArchiveConfig, refs: list[InputRef], ray: Any,
                progress: Callable[[int, int], None] | None = None) -> ArchiveResult:
    """Run ``cfg``'s model over ``refs`` on the connected Ray cluster, resuming after losses.

    Args:
        cfg: the job.
        refs: the inputs (see :func:`meddx.cluster.sources.list_inputs`).
        ray: the connected ``ray`` module (:func:`meddx.cluster.connect`).
        progress: called with (inputs done, inputs total) as blocks finish.

    Raises:
        ModelError: the package fails verification.
        ConfigError: ``cfg.out`` holds another model's results.
        MeddxError: the cluster kept losing work for ``cfg.attempts`` runs.
    """
    from meddx.package import load_package

    package = load_package(cfg.model)  # verify once on the driver: fail before any cluster work
    _open_out(cfg.out, package.sha256, cfg.model)
    already = done_ids(cfg.out) & {r.id for r in refs}
    total, done, written, errors = len(refs), len(already), 0, 0
    if progress:
        progress(done, total)
    attempt = 0
    while attempt < cfg.attempts:
        attempt += 1
        blocks = plan_blocks(refs, done_ids(cfg.out), cfg.block_size)
        if not blocks:
            break
        try:
            for summary in _pipeline(ray, cfg, blocks, package.sha256, package.card):
                done += summary["rows"]
                written += summary["rows"]
                errors += summary["errors"]
                if progress:
                    progress(done, total)
            break
        except (ray.exceptions.RayError, ray.exceptions.RaySystemError) as e:
            # a lost node or actor; the parts on disk are whole, so the rest runs again
            logger.warning("attempt %d lost work (%s); resuming the remaining inputs", attempt,
                           type(e).__name__)
            if attempt >= cfg.attempts:
                raise MeddxError(f"the cluster lost work in all {cfg.attempts} attempts",
                                 hint="check the Ray nodes (`ray status`), then rerun the "
                                 "same command: it resumes where it stopped") from e
    left = {r.id for r in refs} - done_ids(cfg.out)
    if left:
        raise MeddxError(f"{len(left)} inputs have no result row after {attempt} attempts",
                         hint="rerun the same command; it resumes where it stopped")
    return ArchiveResult(listed=total, skipped=len(already), written=written, errors=errors,
                         attempts=attempt, out=str(cfg.out))
