"""Molecules: SMILES → RDKit (sanitised) → Chemprop graph (D-MPNN) or ECFP fingerprint (MLP).

Training tables are CSV files with a SMILES column and one label column per task (an empty
cell is a missing label, masked in the multilabel loss). A SMILES that RDKit cannot sanitise,
an empty one and a wildcard-only one are dropped and reported — count, CSV line numbers and
reasons in the log and in ``bundle.info["dropped"]`` (the bundled Tox21 has 8, HIV 7) — unless
``data.options.strict`` makes them an error. At prediction time each is an error naming the
input.

Splits: ``data.split: random`` (default; stratified for single-task data) or ``scaffold``
(deterministic Bemis–Murcko split, largest scaffold groups to train, as DeepChem does; the
calibration split is then carved from train by the same rule). Featurizer by
``data.options.featurizer``: ``graph`` (Chemprop ``MolGraph``, batched as ``BatchMolGraph``,
model ``dmpnn``) or ``ecfp`` (Morgan bits, model ``ecfp_mlp``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from meddx.errors import ConfigError, DataError
from meddx.modalities.base import DataBundle, Modality, Sample, Split, carve_split
from meddx.modalities.molecule.io import (
    collate_inputs,
    featurize,
    graph_featurizer,
    parse_smiles,
    require_mol,
)
from meddx.modalities.molecule.scaffold import scaffold_of, scaffold_split
from meddx.modalities.splitting import (
    limit_indices,
    random_split,
)

__all__ = ["MoleculeModality", "MoleculeOptions"]

logger = logging.getLogger(__name__)


class MoleculeOptions(BaseModel):
    """``data.options`` for molecules.

    Args:
        smiles_column: column holding SMILES.
        label_columns: one column per task label (default: the task's class names for
            multilabel tasks, ``label`` otherwise).
        featurizer: ``graph`` (Chemprop D-MPNN input) or ``ecfp`` (Morgan fingerprint).
        fp_radius / fp_bits: Morgan radius (2 = ECFP4) and length.
        descriptors: ``rdkit2d`` appends ~200 RDKit 2D descriptors (standardised on the
            training split) to the D-MPNN embedding, as Chemprop's ``rdkit_2d`` features;
            graph featurizer only.
        strict: an invalid SMILES in the training table is an error instead of a dropped row.
        split_seed: seed of the random split (default: the run's seed).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    smiles_column: str = "smiles"
    label_columns: list[str] | None = None
    featurizer: Literal["graph", "ecfp"] = "graph"
    fp_radius: int = Field(2, ge=0, le=6)
    fp_bits: int = Field(2048, ge=64)
    descriptors: Literal["none", "rdkit2d"] = "none"
    strict: bool = False
    split_seed: int | None = None


def _read_table(path: Path, opts: MoleculeOptions, label_columns: list[str]) -> pd.DataFrame:
    try:
        df = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError,
            EOFError) as e:
        raise DataError(f"cannot read molecule table: {e}", path=str(path)) from e
    missing = [c for c in [opts.smiles_column, *label_columns] if c not in df.columns]
    if missing:
        raise DataError(f"molecule table lacks column(s) {missing}", path=str(path),
                        hint=f"columns present: {list(df.columns)}; set data.options."
                        "smiles_column / label_columns")
    if df.empty:
        raise DataError("molecule table has no rows", path=str(path))
    return df


def _labels(df: pd.DataFrame, columns: list[str], task: Any, path: Path
            ) -> tuple[Any, np.ndarray]:
    """Labels and a per-row "no label at all" mask.

    Multilabel / regression: a float matrix (N, K) with NaN for missing cells, checked to be
    0/1 for classification. Single-label tasks: the raw column (numbers or class names).
    """
    if task.kind not in ("multilabel", "regression"):
        raw = df[columns[0]]
        missing = raw.isna() | (raw.astype(str).str.strip() == "")
        return raw.tolist(), missing.to_numpy()
    try:
        y = df[columns].apply(pd.to_numeric, errors="raise").to_numpy(dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise DataError(f"label columns {columns} hold non-numeric values: {e}",
                        path=str(path)) from e
    if task.kind == "multilabel":
        bad = ~(np.isnan(y) | (y == 0) | (y == 1))
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise DataError(f"label {y[row, col]!r} in column '{columns[col]}' is not 0, 1 or "
                            f"empty", path=str(path), sample_id=f"line {row + 2}")
    return y, np.isnan(y).all(axis=1)


class MoleculeModality(Modality):
    """Small molecules from SMILES."""

    name = "molecule"
    inline_flag = "--smiles"
    Options = MoleculeOptions
    input_hint = "send SMILES strings as JSON, or a SMILES/CSV file as multipart/form-data"

    def from_json(self, item: Any) -> Any:
        """A SMILES string is the input itself."""
        return item

    # ---------------------------------------------------------------- reading
    def load(self, data: Any, entry: Any | None, task: Any | None, seed: int) -> DataBundle:
        from meddx.catalog import resolve

        opts = self.parse_options({**(entry.options if entry else {}), **data.options})
        task = task or (entry.task if entry else None)
        if task is None:
            raise ConfigError("a molecule dataset from a path needs a task (kind, class_names)")
        if data.split not in ("default", "random", "scaffold"):
            raise ConfigError(f"unknown split '{data.split}' for molecules; use random or "
                              "scaffold")
        path = Path(data.path) if data.path else resolve(entry)[0]
        columns = opts.label_columns or (task.class_names if task.kind == "multilabel"
                                         else ["label"])
        if task.kind == "multilabel" and len(columns) != task.num_classes:
            raise ConfigError(f"{len(columns)} label columns for {task.num_classes} task labels")
        df = _read_table(path, opts, columns)
        full, dropped = self._parse_rows(df, columns, task, opts, path)
        splits, info = self._split(full, task, data, opts, seed)
        spec = self._spec(opts, task)
        if opts.descriptors != "none":
            if opts.featurizer != "graph":
                raise ConfigError("descriptors need the graph featurizer (dmpnn)")
            from meddx.modalities.molecule.descriptors import fit_scaler

            spec.update(fit_scaler(splits["train"].inputs))
        info.update(_info(entry, path), n_molecules=len(df), n_used=len(full), dropped=dropped)
        return DataBundle(dataset=entry.name if entry else str(path), modality=self.name,
                          task=task, splits=splits, input_spec=spec, info=info)

    def _parse_rows(self, df: pd.DataFrame, columns: list[str], task: Any,
                    opts: MoleculeOptions, path: Path) -> tuple[Split, dict[str, Any]]:
        y, unlabelled = _labels(df, columns, task, path)
        keep, rows, smiles, reasons, scaffolds, no_label = [], [], [], [], [], []
        for i, s in enumerate(df[opts.smiles_column].tolist()):
            parsed = parse_smiles(s)
            if parsed.mol is None:
                rows.append(i + 2)  # CSV line number: the header is line 1
                smiles.append(parsed.smiles)
                reasons.append(parsed.reason)
            elif unlabelled[i]:
                no_label.append(i + 2)
            else:
                keep.append(i)
                scaffolds.append(scaffold_of(parsed.mol))
        if rows and opts.strict:
            raise DataError(f"{len(rows)} invalid SMILES in the training table (strict mode), "
                            f"first at line {rows[0]}: {smiles[0]!r}: {reasons[0]}",
                            path=str(path), hint="fix or remove these rows, or drop strict")
        if rows:
            logger.warning("dropped %d invalid SMILES from %s at CSV lines %s", len(rows),
                           path.name, rows)
        if no_label:
            logger.warning("dropped %d rows without any label from %s at CSV lines %s",
                           len(no_label), path.name, no_label[:50])
        dropped = {"count": len(rows), "rows": rows, "smiles": smiles, "reasons": reasons,
                   "row_numbering": "CSV line number (header = line 1)",
                   "unlabelled_count": len(no_label), "unlabelled_rows": no_label}
        keep_idx = np.asarray(keep, dtype=int)
        inputs = [str(df[opts.smiles_column].iloc[i]).strip() for i in keep_idx]
        ids = [f"line{i + 2}" for i in keep_idx]
        targets = self._targets(y, keep_idx, task, ids)
        meta = pd.DataFrame({"scaffold": scaffolds})
        return Split("all", inputs, targets, ids, metadata=meta), dropped

    @staticmethod
    def _targets(y: Any, keep: np.ndarray, task: Any, ids: list[str]) -> np.ndarray:
        if task.kind == "multilabel":
            return y[keep].astype(np.float32)
        if task.kind == "regression":
            return y[keep, 0].astype(np.float32)
        values = task.label_values if task.label_values is not None else list(range(
            task.num_classes))
        return np.asarray([task.encode(_as_label(y[i], values), sid)
                           for i, sid in zip(keep, ids, strict=True)], dtype=np.int64)

    @staticmethod
    def _split(full: Split, task: Any, data: Any, opts: MoleculeOptions, seed: int
               ) -> tuple[dict[str, Split], dict[str, Any]]:
        strat = task.target_index(full.targets) if task.kind in ("binary", "multiclass") else None
        scaffolds = full.metadata["scaffold"].tolist()
        if data.split == "scaffold":
            fr = [1 - data.val_fraction - data.test_fraction, data.val_fraction,
                  data.test_fraction]
            tr, va, te = scaffold_split(scaffolds, fr)
            info = {"split": "scaffold (Bemis–Murcko, largest groups to train; deterministic)"}
        else:
            split_seed = seed if opts.split_seed is None else opts.split_seed
            tr, va, te = random_split(len(full), strat, data.val_fraction, data.test_fraction,
                                      split_seed)
            info = {"split": f"random{' stratified' if strat is not None else ''} "
                             f"(seed {split_seed})"}
        parts = {"train": full.subset(tr, "train"), "val": full.subset(va, "val"),
                 "test": full.subset(te, "test")}
        if data.calib_fraction > 0:
            parts["train"], parts["calib"] = _carve_calib(parts["train"], task, data, seed)
            if data.split == "scaffold":
                info["split"] += "; calib = the smallest scaffold groups of train"
        out = {}
        for name in ("train", "val", "calib", "test"):
            if name in parts and len(parts[name]):
                s = parts[name]
                out[name] = s.subset(limit_indices(np.arange(len(s)), data.limit, seed), name)
        return out, info

    @staticmethod
    def _spec(opts: MoleculeOptions, task: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {"format": "smiles", "sanitize": True,
                                "featurizer": opts.featurizer, "task_kind": task.kind,
                                "positive_index": task.positive_index}
        if opts.featurizer == "graph":
            atom_fdim, bond_fdim = graph_featurizer().shape
            spec.update(atom_features="chemprop-v2", atom_fdim=int(atom_fdim),
                        bond_fdim=int(bond_fdim))
        else:
            spec.update(fp_radius=opts.fp_radius, fp_bits=opts.fp_bits)
        return spec

    def item_tensor(self, item: Any, input_spec: dict[str, Any]) -> Any:
        if isinstance(item, str):
            return featurize(item, input_spec)
        return item

    def read(self, source: Any, input_spec: dict[str, Any]) -> Sample:
        """Read a SMILES string, ``{"smiles", "id"}`` or an RDKit ``Mol``.

        Raises:
            DataError: invalid, empty or wildcard-only SMILES (naming the input).
        """
        sid = None
        if isinstance(source, dict) and isinstance(source.get("data"), bytes | bytearray):
            try:  # an uploaded file: one SMILES (a .smi line may add a name after a space)
                lines = bytes(source["data"]).decode("utf-8").split("\n")
            except UnicodeDecodeError as e:
                raise DataError("the uploaded molecule file is not UTF-8 text") from e
            lines = [ln.strip() for ln in lines if ln.strip()]
            if len(lines) != 1:
                raise DataError(f"the uploaded file holds {len(lines)} lines; send one SMILES "
                                "per input")
            source = lines[0].split()[0]
        if isinstance(source, dict):
            if "smiles" not in source:
                raise DataError("a molecule input needs a 'smiles' field")
            sid, source = source.get("id"), source["smiles"]
        if type(source).__name__ == "Mol":
            from rdkit import Chem

            source = Chem.MolToSmiles(source)
        if not isinstance(source, str):
            raise DataError(f"cannot read a molecule from {type(source).__name__}",
                            hint="pass a SMILES string")
        mol = require_mol(source, sid)
        smiles = source.strip()
        x = featurize(smiles, input_spec)
        return Sample(id=str(sid or smiles), tensor=x,
                      meta={"smiles": smiles, "n_atoms": mol.GetNumAtoms()})

    def collate(self, batch: list[tuple[Any, Any]]) -> tuple[Any, torch.Tensor]:
        """Chemprop ``BatchMolGraph`` for graphs (``MolBatch`` with descriptors), a stacked
        tensor for fingerprints."""
        xs, ys = zip(*batch, strict=True)
        y = torch.stack([torch.as_tensor(np.asarray(v)) for v in ys])
        return collate_inputs(list(xs)), y

    # ------------------------------------------------------------------ models
    def default_network(self, task: Any, input_spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return ("ecfp_mlp" if input_spec.get("featurizer") == "ecfp" else "dmpnn"), {}

    def network_spec(self, input_spec: dict[str, Any]) -> dict[str, Any]:
        if input_spec.get("featurizer", "graph") == "ecfp":
            bits = int(input_spec.get("fp_bits", 2048))
            return {"spatial_dims": 0, "in_channels": bits, "size": None, "featurizer": "ecfp"}
        spec = {"spatial_dims": 0, "in_channels": int(input_spec["atom_fdim"]), "size": None,
                "featurizer": "graph", "bond_fdim": int(input_spec["bond_fdim"])}
        if input_spec.get("descriptors", "none") != "none":
            spec["descriptor_dim"] = int(input_spec["descriptor_dim"])
        return spec

    def explainer(self, model: torch.nn.Module, input_spec: dict[str, Any], **options: Any) -> Any:
        from meddx.modalities.molecule.explain import AtomExplainer

        return AtomExplainer(model, input_spec, **options)

    def to_fhir(self, prediction: Any, card: Any) -> dict[str, Any]:
        raise ConfigError(
            "no FHIR mapping for molecule predictions",
            hint="a compound is not a patient: FHIR R4 Observation/RiskAssessment need a "
            "patient subject; use the JSON prediction (meddx predict / POST /predict)")


def _carve_calib(train: Split, task: Any, data: Any, seed: int) -> tuple[Split, Split]:
    if data.split == "scaffold":
        f = data.calib_fraction
        rest, calib = scaffold_split(train.metadata["scaffold"].tolist(), [1 - f, f])
        return train.subset(rest, "train"), train.subset(calib, "calib")
    strat = task.target_index(train.targets) if task.kind in ("binary", "multiclass") else None
    return carve_split(train, data.calib_fraction, seed, strat, "calib")


def _as_label(v: Any, values: list[Any]) -> Any:
    """A number read from CSV (1.0) as the matching raw label value (1 or "1")."""
    if not isinstance(v, int | float | np.number):
        return v
    for cand in values:
        try:
            if float(cand) == v:
                return cand
        except (TypeError, ValueError):
            continue
    return v


def _info(entry: Any, path: Path) -> dict[str, Any]:
    if entry is None:
        return {"source": str(path)}
    return {"source": str(path), "title": entry.title, "license": entry.license,
            "citation": entry.citation, "homepage": entry.homepage}
