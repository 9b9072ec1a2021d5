"""Tabular modality: one row of clinical variables per patient (e.g. UCI Heart Disease).

Numeric columns are standardised with train-set mean and standard deviation (missing → the
mean, plus a ``<column>_missing`` indicator for columns with gaps in the training data);
categorical columns are one-hot encoded over the categories seen in training. Everything
``read()`` needs is in ``input_spec``. A category never seen in training is an
:class:`~meddx.errors.InputMismatchError`, not a silent all-zero row.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from meddx.errors import ConfigError, DataError, InputMismatchError
from meddx.modalities.base import DataBundle, Modality, Sample, Split, carve_split

__all__ = ["TabularModality", "TabularExplainer"]

logger = logging.getLogger(__name__)


def _cat(value: Any) -> str:
    """Category label: 3.0 and "3" are the same category."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


class TabularModality(Modality):
    """Rows of numeric and categorical columns → a standardised feature vector."""

    name = "tabular"
    fhir_risk_assessment = True

    class Options(BaseModel):
        """``data.options`` for tables.

        Args:
            format: ``csv`` (with a header) or ``headerless`` (give ``columns``).
            columns: column names for header-less files (UCI ``processed.*.data``).
            target: the label column.
            positive_if_above: binarise a numeric target (``value > x`` → label 1); UCI heart:
                0 (``num`` 1–4 = disease).
            categorical: columns one-hot encoded; the others are numeric.
            drop: columns not used as features.
            na_values: strings meaning "missing".
            sources: file names (of the catalog entry) to read; default: all.
            subgroups: columns kept as split metadata for subgroup analysis.
        """

        model_config = ConfigDict(frozen=True, extra="forbid")
        format: Literal["csv", "headerless"] = "csv"
        columns: list[str] | None = None
        target: str = "target"
        positive_if_above: float | None = None
        categorical: list[str] = Field(default_factory=list)
        drop: list[str] = Field(default_factory=list)
        na_values: list[str] = Field(default_factory=lambda: ["?", ""])
        sources: list[str] | None = None
        subgroups: list[str] = Field(default_factory=list)

    # ---------------------------------------------------------------- loading
    def _read_table(self, paths: list[Path], opts: Options) -> pd.DataFrame:
        frames = []
        for p in paths:
            if opts.sources and p.name not in opts.sources:
                continue
            try:
                df = pd.read_csv(p, header=None if opts.format == "headerless" else "infer",
                                 names=opts.columns if opts.format == "headerless" else None,
                                 na_values=opts.na_values, keep_default_na=True)
            except (OSError, ValueError) as e:
                raise DataError(f"cannot read table: {e}", path=str(p)) from e
            df["source"] = p.name
            frames.append(df)
        if not frames:
            raise DataError("no table file selected", hint=f"sources: {opts.sources}")
        df = pd.concat(frames, ignore_index=True)
        if opts.target not in df.columns:
            raise DataError(f"target column '{opts.target}' not found",
                            hint=f"columns: {list(df.columns)}")
        if df[opts.target].isna().any():
            row = int(np.flatnonzero(df[opts.target].isna().to_numpy())[0])
            raise DataError(f"missing label in row {row + 1}", sample_id=str(row))
        return df

    def load(self, data: Any, entry: Any | None, task: Any | None, seed: int) -> DataBundle:
        """Read the table, split train/val/test (stratified, seeded), carve calib from train."""
        from sklearn.model_selection import train_test_split

        opts = self.parse_options({**(entry.options if entry else {}), **data.options})
        if entry is not None:
            from meddx.catalog import resolve

            paths = resolve(entry)
        elif data.path:
            paths = [Path(data.path)]
        else:
            raise ConfigError("give data.dataset (e.g. uci_heart) or data.path (a CSV file)")
        df = self._read_table([p for p in paths if p.is_file()], opts)
        if task is None:
            task = entry.task if entry else None
        if task is None:
            raise ConfigError("a tabular dataset needs a task (config.task)")
        raw = df[opts.target]
        if opts.positive_if_above is not None:
            raw = (pd.to_numeric(raw) > opts.positive_if_above).astype(int)
        ids = [f"{s}:{i}" for s, i in zip(df["source"], df.index, strict=True)]
        targets = np.asarray([task.encode(v, sample_id=i) for v, i in zip(raw, ids, strict=True)])
        features = df.drop(columns=[opts.target, "source", *opts.drop])
        meta = df[[c for c in ["source", *opts.subgroups] if c in df.columns]].reset_index(drop=True)
        full = Split("all", np.arange(len(df)), targets, ids, metadata=meta)
        y = task.target_index(targets)
        rest, test = train_test_split(np.arange(len(df)), test_size=data.test_fraction,
                                      random_state=seed, stratify=y)
        val_share = data.val_fraction / (1 - data.test_fraction)
        train, val = train_test_split(rest, test_size=val_share, random_state=seed,
                                      stratify=y[rest])
        splits = {"train": full.subset(np.sort(train), "train"),
                  "val": full.subset(np.sort(val), "val"),
                  "test": full.subset(np.sort(test), "test")}
        if data.calib_fraction > 0:
            splits["train"], splits["calib"] = carve_split(
                splits["train"], data.calib_fraction, seed,
                task.target_index(splits["train"].targets), "calib")
        spec = self._fit_spec(features.iloc[splits["train"].inputs], opts)
        for s in splits.values():
            s.inputs = self._encode_frame(features.iloc[s.inputs], spec)
        order = {k: splits[k] for k in ("train", "val", "calib", "test") if k in splits}
        return DataBundle(dataset=entry.name if entry else str(data.path), modality=self.name,
                          task=task, splits=order, input_spec=spec,
                          info={"rows": len(df), "files": sorted(set(df["source"]))})

    @staticmethod
    def _fit_spec(train: pd.DataFrame, opts: Options) -> dict[str, Any]:
        numeric, categorical, indicators = {}, {}, []
        for col in train.columns:
            if col in opts.categorical:
                cats = sorted({_cat(v) for v in train[col].dropna()}, key=lambda s: (len(s), s))
                categorical[col] = cats
                continue
            x = pd.to_numeric(train[col], errors="coerce")
            if x.notna().sum() != train[col].notna().sum():
                raise DataError(f"column '{col}' has non-numeric values",
                                hint="list it under data.options.categorical")
            numeric[col] = [float(x.mean()), float(x.std()) or 1.0]
            if x.isna().any():
                indicators.append(col)
        names = [*numeric, *(f"{c}_missing" for c in indicators),
                 *(f"{c}={v}" for c, cats in categorical.items() for v in cats)]
        return {"format": "tabular", "columns": list(train.columns), "numeric": numeric,
                "categorical": categorical, "missing_indicators": indicators,
                "feature_names": names, "n_features": len(names)}

    @staticmethod
    def _encode_frame(frame: pd.DataFrame, spec: Mapping[str, Any]) -> np.ndarray:
        out = np.zeros((len(frame), spec["n_features"]), dtype=np.float32)
        col = 0
        for name, (mean, std) in spec["numeric"].items():
            x = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float)
            out[:, col] = np.nan_to_num((x - mean) / std, nan=0.0)
            col += 1
        for name in spec["missing_indicators"]:
            out[:, col] = frame[name].isna().to_numpy()
            col += 1
        for name, cats in spec["categorical"].items():
            values = [_cat(v) if pd.notna(v) else None for v in frame[name]]
            for i, v in enumerate(values):
                if v is not None and v not in cats:
                    raise InputMismatchError(
                        f"column '{name}' has category {v!r}, never seen in training",
                        hint=f"known categories: {cats}", sample_id=str(frame.index[i]))
            for k, c in enumerate(cats):
                out[:, col + k] = [v == c for v in values]
            col += len(cats)
        return out

    # ---------------------------------------------------------------- reading
    def read(self, source: Any, input_spec: dict[str, Any]) -> Sample:
        """One row (dict, pandas Series, one-row CSV or JSON file) → :class:`Sample`.

        ``meta["imputed"]`` lists the columns that were missing (imputed with the train mean),
        ``meta["ignored"]`` the keys the model does not use.
        """
        if input_spec.get("format") != "tabular":
            raise InputMismatchError("this model was not trained on tables")
        row, sid = self._row(source)
        columns = input_spec["columns"]
        ignored = sorted(set(row) - set(columns))
        imputed = [c for c in columns if row.get(c) is None or
                   (isinstance(row.get(c), float) and np.isnan(row[c]))]
        for c in input_spec["numeric"]:
            v = row.get(c)
            if v is not None and not isinstance(v, int | float):
                try:
                    row[c] = float(v)
                except (TypeError, ValueError) as e:
                    raise DataError(f"column '{c}' must be a number, got {v!r}",
                                    sample_id=sid) from e
        frame = pd.DataFrame([{c: row.get(c) for c in columns}])
        x = self._encode_frame(frame, input_spec)[0]
        return Sample(id=sid, tensor=torch.from_numpy(x),
                      meta={"imputed": imputed, "ignored": ignored})

    @staticmethod
    def _row(source: Any) -> tuple[dict[str, Any], str]:
        if isinstance(source, pd.Series):
            return source.to_dict(), str(source.name)
        if isinstance(source, Mapping):
            return dict(source), "row"
        if isinstance(source, str | Path) and Path(source).is_file():
            p = Path(source)
            if p.suffix.lower() == ".json":
                data = json.loads(p.read_text())
                if not isinstance(data, dict):
                    raise DataError("a JSON row must be an object", path=str(p))
                return data, p.stem
            df = pd.read_csv(p, na_values=["?", ""])
            if len(df) != 1:
                raise DataError(f"expected one row, found {len(df)}", path=str(p),
                                hint="predict one row per input")
            return {k: (None if pd.isna(v) else v) for k, v in df.iloc[0].items()}, p.stem
        raise DataError(f"cannot read a table row from {type(source).__name__}",
                        hint="give a dict of column → value, or a one-row CSV/JSON file")

    def item_tensor(self, item: Any, input_spec: dict[str, Any]) -> torch.Tensor:
        return torch.as_tensor(np.asarray(item, dtype=np.float32))

    def default_network(self, task: Any, input_spec: dict[str, Any]
                        ) -> tuple[str, dict[str, Any]]:
        return "mlp", {"hidden": [64, 32], "dropout": 0.2}

    def network_spec(self, input_spec: dict[str, Any]) -> dict[str, Any]:
        return {"spatial_dims": 0, "in_channels": int(input_spec["n_features"]), "size": None}

    def explainer(self, model: torch.nn.Module, input_spec: dict[str, Any], **options: Any
                  ) -> TabularExplainer:
        options.pop("task", None)
        options.pop("network", None)
        return TabularExplainer(model, input_spec, **options)

    def to_fhir(self, prediction: Any, card: Any) -> dict[str, Any]:
        from meddx.modalities.ehr.fhir import risk_assessment

        return risk_assessment(prediction, card)


class TabularExplainer:
    """Integrated gradients per feature, from the all-mean baseline (zeros)."""

    def __init__(self, model: torch.nn.Module, input_spec: Mapping[str, Any], top_k: int = 4,
                 n_steps: int = 32) -> None:
        self.model, self.spec, self.top_k, self.n_steps = model.eval(), input_spec, top_k, n_steps

    def explain(self, x: Any, class_index: int | None = None) -> tuple[list[str], np.ndarray]:
        """Top features in words (``"chol above average (+1.8 SD)"``) and attributions (F,)."""
        from captum.attr import IntegratedGradients

        t = torch.as_tensor(np.asarray(x.tensor if isinstance(x, Sample) else x),
                            dtype=torch.float32).reshape(1, -1)
        with torch.enable_grad():
            attr = IntegratedGradients(self.model).attribute(
                t, baselines=torch.zeros_like(t), n_steps=self.n_steps)[0].detach().numpy()
        if class_index == 0:
            attr = -attr
        return self.findings(t, attr), attr

    def findings(self, x: Any, attr: np.ndarray) -> list[str]:
        """The ``top_k`` features of ``attr`` (F,) in words, with the input's values."""
        t = torch.as_tensor(np.asarray(x.tensor if isinstance(x, Sample) else x),
                            dtype=torch.float32).reshape(1, -1)
        names = self.spec["feature_names"]
        words = []
        for i in np.argsort(-np.abs(attr))[: self.top_k]:
            value = float(t[0, i])
            if "=" in names[i] or names[i].endswith("_missing"):
                state = names[i] if value > 0 else f"not {names[i]}"
            else:
                side = "above" if value > 0 else "below"
                state = f"{names[i]} {side} average ({value:+.1f} SD)"
            words.append(state + (" (raises the risk)" if attr[i] > 0 else " (lowers the risk)"))
        return words
