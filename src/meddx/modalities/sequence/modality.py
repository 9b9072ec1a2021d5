"""DNA sequences: FASTA or CSV → IUPAC fractional one-hot (4 × L), CNN models, mutagenesis.

Training data comes from a table (CSV/TSV/UCI ``.data``: a sequence, a label and optionally an
id column) or from a FASTA file plus a ``labels_csv`` (``id,label``). Every sequence must have
the same length; the model is built for that length and any other length at prediction time is
an :class:`~meddx.errors.InputMismatchError`. Splits are stratified random (``data.split:
random``/``default``) or, with ``data.options.folds``, one fold of a stratified k-fold
partition as test (cross-validation of small sets). ``calib`` is always carved from train.

:func:`variant_effect` scores a single-nucleotide (or same-length) variant written as
``seq.fa:31:A>G`` (1-based position, reference checked) as reference vs alternate probability.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from meddx.errors import ConfigError, DataError, InputMismatchError
from meddx.modalities.base import DataBundle, Modality, Sample, Split
from meddx.modalities.sequence.io import (
    Record,
    clean,
    encode,
    is_fasta_path,
    parse_fasta,
    read_fasta,
)
from meddx.modalities.splitting import (
    by_group,
    kfold_split,
    limit_indices,
    random_split,
    unique_ids,
)

__all__ = ["SequenceModality", "SequenceOptions", "RandomReverseComplement", "variant_effect",
           "parse_variant"]

logger = logging.getLogger(__name__)

_TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".data", ".csv.gz", ".tsv.gz")


class SequenceOptions(BaseModel):
    """``data.options`` for DNA sequences.

    Args:
        format: ``table`` (CSV/TSV/UCI) or ``fasta`` (+ ``labels_csv``); from the suffix if unset.
        columns: column names for a table without a header row (UCI promoters).
        sequence_column / label_column / id_column: table columns (id: row number if unset).
        labels_csv: for FASTA training data, a CSV with ``id,label`` columns.
        reverse_complement: augment training with random reverse complements (only where the
            label does not depend on the strand; splice junctions and promoters do).
        folds / fold: cross-validation: fold ``fold`` of a stratified ``folds``-fold partition
            is the test split (the partition depends only on ``split_seed``).
        split_seed: seed of the random / k-fold split (default: the run's seed; 0 for k-fold).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["table", "fasta"] | None = None
    columns: list[str] | None = None
    sequence_column: str = "sequence"
    label_column: str = "label"
    id_column: str | None = None
    labels_csv: str | None = None
    reverse_complement: bool = False
    folds: int | None = Field(None, ge=2)
    fold: int = Field(0, ge=0)
    split_seed: int | None = None


class RandomReverseComplement:
    """Training augmentation: with probability ``p`` return the reverse complement.

    On the (4, L) one-hot in A, C, G, T order, the complement reverses the channel axis
    (A↔T, C↔G; fractional ambiguity codes follow) and the strand reverses the length axis.
    """

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) < self.p:
            return x.flip(-2).flip(-1)
        return x


def _read_table(path: Path, opts: SequenceOptions) -> pd.DataFrame:
    sep = "\t" if ".tsv" in path.name.lower() else ","
    try:
        df = pd.read_csv(path, sep=sep, header=None if opts.columns else "infer",
                         names=opts.columns, skipinitialspace=True, dtype=str,
                         keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise DataError(f"cannot read sequence table: {e}", path=str(path)) from e
    df.columns = [str(c).strip() for c in df.columns]
    need = [opts.sequence_column, opts.label_column] + ([opts.id_column] if opts.id_column else [])
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise DataError(
            f"sequence table lacks column(s) {missing}", path=str(path),
            hint=f"columns present: {list(df.columns)}; set data.options.sequence_column / "
            "label_column / id_column (or columns for a file without header)")
    if df.empty:
        raise DataError("sequence table has no rows", path=str(path))
    return df


def _records_from_table(path: Path, opts: SequenceOptions) -> tuple[list[Record], list[str]]:
    df = _read_table(path, opts)
    ids = (df[opts.id_column].str.strip().tolist() if opts.id_column
           else [f"row{i + 1}" for i in range(len(df))])
    records = [Record(id=i, sequence=clean(s, i))
               for i, s in zip(ids, df[opts.sequence_column], strict=True)]
    return records, df[opts.label_column].str.strip().tolist()


def _records_from_fasta(path: Path, opts: SequenceOptions) -> tuple[list[Record], list[str]]:
    if not opts.labels_csv:
        raise ConfigError("FASTA training data needs data.options.labels_csv (columns id,label)")
    records = read_fasta(path)
    lab_path = Path(opts.labels_csv)
    if not lab_path.is_absolute():
        lab_path = path.parent / lab_path
    table = _read_table(lab_path, SequenceOptions(sequence_column="id", label_column="label"))
    labels = dict(zip(table["id"].str.strip(), table["label"].str.strip(), strict=True))
    unlabelled = [r.id for r in records if r.id not in labels]
    if unlabelled:
        raise DataError(f"{len(unlabelled)} FASTA record(s) have no label, e.g. {unlabelled[:3]}",
                        path=str(lab_path))
    return records, [labels[r.id] for r in records]


def _check_lengths(records: list[Record], path: Path) -> int:
    lengths = np.array([len(r.sequence) for r in records])
    length = int(np.bincount(lengths).argmax())
    odd = [r.id for r, n in zip(records, lengths, strict=True) if n != length]
    if odd:
        raise DataError(
            f"{len(odd)} sequence(s) differ from the common length {length}, e.g. '{odd[0]}'",
            path=str(path), sample_id=odd[0],
            hint="trim or pad the sequences to one length (the model is built for it)")
    return length


class SequenceModality(Modality):
    """DNA sequences as IUPAC fractional one-hot (4 × L)."""

    name = "sequence"
    inline_flag = "--sequence"
    Options = SequenceOptions
    input_hint = ("send the sequence as a JSON string (DNA letters, or FASTA text starting "
                  "with '>'), or a FASTA file as multipart/form-data")

    def from_json(self, item: Any) -> Any:
        """A JSON string is DNA: FASTA text (``>`` first) or bare letters, never a path."""
        if isinstance(item, str):
            text = item.strip()
            return {"fasta": text} if text.startswith(">") else {"sequence": text}
        return super().from_json(item)

    # ---------------------------------------------------------------- reading
    def load(self, data: Any, entry: Any | None, task: Any | None, seed: int) -> DataBundle:
        from meddx.catalog import resolve

        opts = self.parse_options({**(entry.options if entry else {}), **data.options})
        if data.split not in ("default", "random"):
            raise ConfigError(f"sequence datasets split 'random' (or use data.options.folds), "
                              f"not '{data.split}'")
        path = Path(data.path) if data.path else resolve(entry)[0]
        fmt = opts.format or ("fasta" if is_fasta_path(path.name) else "table")
        records, raw = (_records_from_fasta if fmt == "fasta" else _records_from_table)(path, opts)
        length = _check_lengths(records, path)
        task = task or (entry.task if entry else None)
        if task is None:
            raise ConfigError("a sequence dataset from a path needs a task (kind, class_names)",
                              hint="add a `task:` block to the config")
        targets = np.asarray([task.encode(v, r.id) for v, r in zip(raw, records, strict=True)])
        full = Split("all", [r.sequence for r in records], targets,
                     unique_ids([r.id for r in records]))
        splits, info = self._split(full, task, data, opts, seed)
        spec = {"format": "dna-onehot", "alphabet": "ACGT", "iupac": "fractional",
                "channels": 4, "length": length, "spatial_dims": 1, "size": length,
                "reverse_complement": opts.reverse_complement, "task_kind": task.kind,
                "positive_index": task.positive_index}
        info.update(_info(entry, path), n_sequences=len(records), length=length)
        return DataBundle(dataset=entry.name if entry else str(path), modality=self.name,
                          task=task, splits=splits, input_spec=spec, info=info)

    @staticmethod
    def _split(full: Split, task: Any, data: Any, opts: SequenceOptions, seed: int
               ) -> tuple[dict[str, Split], dict[str, Any]]:
        """Split with identical sequences kept together (the UCI splice file repeats 185)."""
        strat = task.target_index(full.targets) if task.kind != "multilabel" else None
        keys = list(full.inputs)
        if opts.folds:
            split_seed = 0 if opts.split_seed is None else opts.split_seed
            tr, va, te = by_group(keys, strat, lambda n, s: kfold_split(
                n, s, opts.folds, opts.fold, data.val_fraction, split_seed))
            info = {"split": f"stratified {opts.folds}-fold cross-validation, test = fold "
                             f"{opts.fold} (partition seed {split_seed})"}
        else:
            split_seed = seed if opts.split_seed is None else opts.split_seed
            tr, va, te = by_group(keys, strat, lambda n, s: random_split(
                n, s, data.val_fraction, data.test_fraction, split_seed))
            info = {"split": f"stratified random (seed {split_seed})"}
        dups = len(keys) - len(set(keys))
        info["duplicates"] = (f"{dups} repeated sequences, kept within one split" if dups
                              else "none")
        if len(full) < 300:
            info["note"] = (f"only {len(full)} sequences: a single test split is noisy; "
                            "cross-validate (data.options.folds, benchmarks/genomics.py)")
        parts = {"train": tr, "val": va, "test": te}
        if data.calib_fraction > 0:
            t_strat = None if strat is None else strat[tr]
            rest, calib = by_group([keys[i] for i in tr], t_strat, lambda n, s: random_split(
                n, s, data.calib_fraction, 0.0, seed)[:2])
            parts["train"], parts["calib"] = tr[rest], tr[calib]
        splits = {k: full.subset(limit_indices(v, data.limit, seed), k)
                  for k, v in parts.items() if len(v)}
        order = ("train", "val", "calib", "test")
        return {k: splits[k] for k in order if k in splits}, info

    def item_tensor(self, item: Any, input_spec: dict[str, Any]) -> torch.Tensor:
        if isinstance(item, torch.Tensor):
            return item.float()
        return torch.from_numpy(encode(item))

    def variant_effect(self, predictor: Any, variant: str) -> dict[str, Any]:
        """Reference vs alternate probability of a variant ``seq.fa:31:A>G``
        (see :func:`variant_effect`)."""
        return variant_effect(predictor, variant)

    def read(self, source: Any, input_spec: dict[str, Any]) -> Sample:
        """Read a DNA string, FASTA text, a FASTA path, ``{"sequence", "id"}`` or a (4, L) array.

        Raises:
            DataError: empty or unreadable input, non-IUPAC characters, several FASTA records.
            InputMismatchError: a length other than the model's.
        """
        record, meta = self._record(source)
        want = input_spec.get("length")
        if want is not None and len(record.sequence) != want:
            raise InputMismatchError(
                f"sequence '{record.id}' has {len(record.sequence)} bases; the model takes "
                f"exactly {want}", sample_id=record.id,
                hint=f"give a {want}-base window (e.g. centred on the site of interest)")
        x = torch.from_numpy(encode(record.sequence, record.id))
        return Sample(id=record.id, tensor=x,
                      meta={"sequence": record.sequence, "length": len(record.sequence), **meta})

    def _record(self, source: Any) -> tuple[Record, dict[str, Any]]:
        if isinstance(source, torch.Tensor | np.ndarray):
            return _record_from_array(np.asarray(source)), {"format": "array"}
        if isinstance(source, dict):
            if isinstance(source.get("data"), bytes | bytearray):  # an uploaded file
                try:
                    source = bytes(source["data"]).decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError("the uploaded sequence file is not UTF-8 text") from e
                text = source.strip()
                if text.startswith(">"):
                    return _single(parse_fasta(text, "FASTA upload"), "FASTA upload"), {}
                return Record("sequence", clean(text, "sequence")), {}
            if "fasta" in source:
                return _single(parse_fasta(str(source["fasta"]), "FASTA text"), "FASTA text"), {}
            if "sequence" not in source:
                raise DataError("a sequence input needs a 'sequence' (or 'fasta') field")
            sid = str(source.get("id") or "sequence")
            return Record(sid, clean(source["sequence"], sid)), {}
        if isinstance(source, Path) or (isinstance(source, str) and _looks_like_path(source)):
            p = Path(source)
            return _single(read_fasta(p), str(p)), {"path": str(p)}
        if isinstance(source, str):
            text = source.strip()
            if text.startswith(">"):
                return _single(parse_fasta(text, "FASTA text"), "FASTA text"), {}
            return Record("sequence", clean(text, "sequence")), {}
        raise DataError(f"cannot read a DNA sequence from {type(source).__name__}")

    def transforms(self, train: bool, input_spec: dict[str, Any], augment: Any) -> Any:
        if not train or not input_spec.get("reverse_complement"):
            return None
        if augment is not None and not getattr(augment, "enabled", True):
            return None
        return RandomReverseComplement()

    # ------------------------------------------------------------------ models
    def default_network(self, task: Any, input_spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return "seq_cnn", {}

    def network_spec(self, input_spec: dict[str, Any]) -> dict[str, Any]:
        length = int(input_spec["length"])
        return {"spatial_dims": 1, "in_channels": 4, "size": length, "length": length}

    def explainer(self, model: torch.nn.Module, input_spec: dict[str, Any], **options: Any) -> Any:
        from meddx.modalities.sequence.explain import ISMExplainer

        return ISMExplainer(model, input_spec, **options)

    def to_fhir(self, prediction: Any, card: Any) -> dict[str, Any]:
        """An R4 ``Observation``: the predicted class, with each class probability a component."""
        from meddx.modalities.sequence.fhir import observation

        return observation(prediction, card, what="DNA sequence")


def _looks_like_path(text: str) -> bool:
    # valid DNA never contains '.', '/' or '\\'; anything that does is meant as a file
    return any(c in text for c in "./\\") or is_fasta_path(text) or os.path.isfile(text)


def _single(records: list[Record], source: str) -> Record:
    if len(records) != 1:
        raise DataError(f"{source} holds {len(records)} sequences; give one per input",
                        path=source, hint="split the FASTA file, or pass each sequence separately")
    return records[0]


def _record_from_array(x: np.ndarray) -> Record:
    if x.ndim != 2 or x.shape[0] != 4:
        raise InputMismatchError(f"array has shape {x.shape}; a one-hot sequence is (4, L)")
    if not np.isfinite(x).all() or (x < 0).any() or not np.allclose(x.sum(0), 1, atol=1e-4):
        raise DataError("array is not a one-hot DNA encoding (columns must sum to 1)")
    seq = "".join("ACGT"[i] if x[i, j] > 0.99 else "N" for j, i in enumerate(x.argmax(0)))
    return Record("array", seq)


def _info(entry: Any, path: Path) -> dict[str, Any]:
    if entry is None:
        return {"source": str(path)}
    return {"source": str(path), "title": entry.title, "license": entry.license,
            "citation": entry.citation, "homepage": entry.homepage}


# --------------------------------------------------------------- variant effect
def parse_variant(spec: str) -> tuple[str, str | None, int, str, str]:
    """Split ``path[:record]:pos:REF>ALT`` (or ``SEQUENCE:pos:REF>ALT``) into its parts.

    Returns:
        (source, record id or None, 1-based position, ref, alt)
    """
    parts = spec.rsplit(":", 2)
    if len(parts) != 3 or ">" not in parts[2] or not parts[1].strip().isdigit():
        raise DataError(f"variant '{spec}' is not of the form FILE:POSITION:REF>ALT",
                        hint="e.g. seq.fa:31:A>G (1-based position); add :RECORD before the "
                        "position for a multi-record FASTA")
    head, pos, change = parts
    ref, _, alt = change.partition(">")
    record = None
    if not Path(head).is_file() and ":" in head:
        head, record = head.rsplit(":", 1)
    return head, record, int(pos), clean(ref, "REF"), clean(alt, "ALT")


def variant_effect(predictor: Any, spec: str) -> dict[str, Any]:
    """Reference vs alternate prediction for a variant ``seq.fa:31:A>G``.

    The sequence is read from the FASTA file (or given inline instead of a path), the
    reference allele is checked at the 1-based position, the alternate sequence is built and
    both are predicted; Δ = alternate − reference per class (calibrated when the package is).

    Raises:
        DataError: malformed spec, position out of range, reference allele that does not match.
        InputMismatchError: an insertion/deletion (the model takes a fixed length).
    """
    source, record_id, pos, ref, alt = parse_variant(spec)
    record = _variant_record(source, record_id)
    seq = record.sequence
    if len(ref) != len(alt):
        raise InputMismatchError(f"variant {ref}>{alt} changes the length; the model takes a "
                                 "fixed length, so only substitutions can be scored")
    if not 1 <= pos <= len(seq) - len(ref) + 1:
        raise DataError(f"position {pos} is outside sequence '{record.id}' (1..{len(seq)})",
                        sample_id=record.id)
    found = seq[pos - 1 : pos - 1 + len(ref)]
    if found != ref:
        raise DataError(f"reference allele at position {pos} of '{record.id}' is {found}, "
                        f"not {ref}", sample_id=record.id, hint="positions are 1-based")
    alt_seq = seq[: pos - 1] + alt + seq[pos - 1 + len(ref):]
    p_ref, p_alt = predictor.predict([{"sequence": seq, "id": record.id},
                                      {"sequence": alt_seq, "id": f"{record.id}:{pos}{ref}>{alt}"}])
    calibrated = p_ref.calibrated is not None
    a = p_ref.calibrated or p_ref.probabilities
    b = p_alt.calibrated or p_alt.probabilities
    return {
        "variant": f"{record.id}:{pos}:{ref}>{alt}", "sequence_id": record.id, "position": pos,
        "ref": ref, "alt": alt, "calibrated": calibrated,
        "reference": {k: round(float(v), 6) for k, v in a.items()},
        "alternate": {k: round(float(v), 6) for k, v in b.items()},
        "delta": {k: round(float(b[k] - a[k]), 6) for k in a},
        "label_reference": p_ref.label, "label_alternate": p_alt.label,
    }


def _variant_record(source: str, record_id: str | None) -> Record:
    if Path(source).is_file() or _looks_like_path(source):
        records = read_fasta(source)
        if record_id is not None:
            hits = [r for r in records if r.id == record_id]
            if not hits:
                raise DataError(f"no record '{record_id}' in {source}", path=source)
            return hits[0]
        return _single(records, source)
    return Record("sequence", clean(source, "sequence"))
