"""EHR modality: ICU stays (PhysioNet 2012 files, FHIR R4B Bundles, CDS Hooks prefetch).

``EHRModality`` ("ehr") predicts an outcome of an ICU stay from the observations made
between ICU admission and the prediction time (at most 48 h). Training data are the
PhysioNet/CinC 2012 stays, read once into a feature cache; at prediction time ``read()`` takes
a stay file, a FHIR Bundle or a CDS Hooks prefetch and returns the same tensor the model was
trained on, stating in ``Sample.meta`` how many hours were used and what was left out.
``TabularModality`` ("tabular") lives in :mod:`meddx.modalities.ehr.tabular`.

Reading pipeline (one code path for every source)::

    file ──read_physionet_stay──┐
    Bundle / prefetch ──stay_from_fhir──┴─► Stay ─bin_stay─► hourly arrays ─encode─► (C, 48)
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from meddx.errors import ConfigError, DataError, InputMismatchError
from meddx.modalities.base import DataBundle, Modality, Sample, Split, carve_split
from meddx.modalities.ehr.features import (
    BINS,
    FEATURE_VERSION,
    STATIC_NAMES,
    bin_stay,
    cached_features,
    encode,
    fit_stats,
    layout,
    truncate,
)
from meddx.modalities.ehr.fhir import risk_assessment, stay_from_fhir
from meddx.modalities.ehr.io import (
    DROP_REASONS,
    ICU_TYPES,
    Stay,
    count_dropped,
    make_split_lists,
    mapping_table_sha256,
    read_outcomes,
    read_physionet_stay,
    read_split_list,
    series_variables,
    split_list_path,
    stay_files,
)
from meddx.modalities.ehr.tabular import TabularModality

__all__ = ["EHRModality", "TabularModality", "RandomTruncation", "age_band"]

logger = logging.getLogger(__name__)

_DEFAULT_TASK = {"kind": "binary", "class_names": ["survived", "died"],
                 "positive_class": "died", "label_values": [0, 1]}


def age_band(age: float) -> str:
    """Subgroup label for an age in years."""
    if np.isnan(age):
        return "unknown"
    return "<50" if age < 50 else "50-64" if age < 65 else "65-79" if age < 80 else "80+"


class RandomTruncation:
    """Training transform: keep the first ``h`` hours, ``h`` uniform in
    ``[min_hours, hours available]``, with probability ``p`` (else the whole window), so that
    a prediction made earlier in the stay is one the model has seen."""

    def __init__(self, spec_layout: dict[str, list[int]], min_hours: int = 6, p: float = 1.0):
        self.layout, self.min_hours, self.p = spec_layout, min_hours, p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.p < 1 and float(torch.rand(())) >= self.p:
            return x
        available = int(x[self.layout["valid"][0]].sum())
        if available <= self.min_hours:
            return x
        hours = int(torch.randint(self.min_hours, available + 1, ()))
        return truncate(x, hours, self.layout) if hours < available else x


def _refusal(error: DataError, stay: Stay) -> DataError:
    """The "cannot assess" error of a stay, saying which lines were left out and why."""
    counts = count_dropped(stay.issues)
    if not counts["total"]:
        return error
    why = ", ".join(f"{DROP_REASONS.get(k, k)}: {n}" for k, n in counts["by_reason"].items())
    return DataError(f"{error.message}; {counts['total']} line(s) were left out ({why})",
                     hint=error.hint, **error.context)


def dropped_by_split(feats: dict[str, Any], splits: dict[str, Split]) -> dict[str, Any]:
    """Lines left out while the stays were read, by reason: in total, per split (after the
    calib carve) and for the stays refused for having no usable observation."""
    per_record: dict[str, dict[str, int]] = feats.get("dropped", {})

    def tally(ids: list[str]) -> dict[str, Any]:
        counts: Counter[str] = Counter()
        hit = 0
        for r in ids:
            c = per_record.get(str(r))
            if c:
                hit += 1
                counts.update(c)
        return {"stays": len(ids), "stays_with_dropped_lines": hit,
                "lines": int(sum(counts.values())), "by_reason": dict(counts.most_common())}

    by_split = {name: tally(list(s.ids)) for name, s in splits.items()}
    refused = tally(list(feats.get("empty", [])))
    total: Counter[str] = Counter()
    for t in (*by_split.values(), refused):
        total.update(t["by_reason"])
    return {"total": int(sum(total.values())), "by_reason": dict(total.most_common()),
            "by_split": by_split, "refused_stays": refused,
            "reasons": {k: DROP_REASONS.get(k, k) for k in total}}


class EHRModality(Modality):
    """ICU stays → hourly GRU-D tensors; binary outcome (default: in-hospital death)."""

    name = "ehr"
    fhir_risk_assessment = True
    input_hint = "send a FHIR Bundle or a CDS Hooks prefetch object"

    def from_json(self, item: Any) -> Any:
        """FHIR JSON given as text passes (the reader parses it); other text is refused."""
        if isinstance(item, str) and item.strip().startswith("{"):
            return item
        return super().from_json(item)

    class Options(BaseModel):
        """``data.options`` for EHR datasets.

        Args:
            format: source format (``physionet2012``).
            split_lists: name of packaged record lists (``data/splits/<name>_*.txt``), or a
                folder holding your own ``train.txt``, ``val.txt`` and ``test.txt`` (one
                RecordID per line); None: a stratified random split with
                ``data.val_fraction``/``test_fraction``.
            on_malformed: ``warn`` (skip, log and list) or ``error`` (stop at the first).
            truncate_min_hours / truncate_probability: random truncation in training.
            progress: show a progress bar while the feature cache is built.
        """

        model_config = ConfigDict(frozen=True, extra="forbid")
        format: Literal["physionet2012"] = "physionet2012"
        split_lists: str | None = None
        on_malformed: Literal["warn", "error"] = "warn"
        truncate_min_hours: int = Field(6, ge=1, le=BINS)
        truncate_probability: float = Field(0.5, ge=0.0, le=1.0)
        progress: bool = True

    # ---------------------------------------------------------------- loading
    def _sources(self, data: Any, entry: Any | None) -> tuple[list[Path], list[Path]]:
        if entry is not None:
            from meddx.catalog import resolve

            paths = resolve(entry)
        elif data.path:
            root = Path(data.path)
            if not root.is_dir():
                raise DataError("an EHR data.path must be a folder of stay files and outcomes",
                                path=str(root))
            paths = [root, *sorted(root.rglob("Outcomes*.txt"))]
        else:
            raise ConfigError("give data.dataset (e.g. physionet2012) or data.path")
        folders = [p for p in paths if p.is_dir()]
        outcomes = [p for p in paths if p.is_file() and p.name.lower().startswith("outcomes")]
        if not folders or not outcomes:
            raise DataError("need stay files and an Outcomes file",
                            hint="a folder with set-*/NNNNNN.txt and Outcomes-*.txt")
        return folders, outcomes

    def _record_lists(self, opts: Options, data: Any, outcomes: pd.DataFrame, seed: int
                      ) -> dict[str, list[str]]:
        if opts.split_lists:
            lists = {}
            for split in ("train", "val", "test"):
                p = split_list_path(opts.split_lists, split)
                if not p.is_file():
                    raise ConfigError(f"no record list {p}",
                                      hint="split_lists is a packaged name (physionet2012) or a "
                                           "folder with train.txt, val.txt and test.txt")
                lists[split] = read_split_list(p)
            return lists
        val, test = data.val_fraction, data.test_fraction
        return make_split_lists(outcomes, (1 - val - test, val, test), seed=seed)

    def load(self, data: Any, entry: Any | None, task: Any | None, seed: int) -> DataBundle:
        """Read PhysioNet 2012 stays into train/val/calib/test (calib carved from train).

        Split metadata per stay (subgroups and clinical baselines): ``sex``, ``age_band``
        (<50, 50-64, 65-79, 80+), ``icu_type``, ``saps_i`` (NaN where the outcome file has
        -1), ``sofa``, ``hours`` (hours of data). Stays without any
        observation cannot be assessed and are left out (counted in ``info``).
        """
        from meddx.catalog import cache_dir
        from meddx.tasks import TaskSpec

        opts = self.parse_options({**(entry.options if entry else {}), **data.options})
        task = task or (entry.task if entry else TaskSpec(**_DEFAULT_TASK))
        folders, outcome_files = self._sources(data, entry)
        outcomes = read_outcomes(outcome_files)
        files: dict[str, Path] = {}
        for folder in folders:
            files.update(stay_files(folder))
        lists = self._record_lists(opts, data, outcomes, seed)
        rng = np.random.default_rng(seed)
        for split, ids in lists.items():
            missing = [r for r in ids if r not in files or r not in outcomes.index]
            if missing:
                raise DataError(f"{len(missing)} records of the {split} list have no stay file "
                                f"or outcome (first: {missing[0]})")
            if data.limit and len(ids) > data.limit:
                lists[split] = sorted(rng.choice(ids, data.limit, replace=False).tolist(), key=int)
        wanted = {r: files[r] for ids in lists.values() for r in ids}
        feats = cached_features(wanted, cache_dir() / "ehr", opts.on_malformed, opts.progress)
        self._log_issues(feats["issues"])
        row = {r: i for i, r in enumerate(feats["record_ids"])}
        splits = {name: self._split(name, [r for r in ids if r in row], row, feats, outcomes, task)
                  for name, ids in lists.items()}
        if data.calib_fraction > 0:
            strat = task.target_index(splits["train"].targets)
            splits["train"], splits["calib"] = carve_split(
                splits["train"], data.calib_fraction, seed, strat, "calib")
        stats = fit_stats(feats["values"][splits["train"].inputs],
                          feats["static"][splits["train"].inputs])
        for s in splits.values():
            idx = s.inputs
            s.inputs = encode(feats["values"][idx], feats["static"][idx], feats["hours"][idx], stats)
        spec = self._input_spec(stats, opts)
        info = self._info(entry, feats, lists, outcomes)
        order = {k: splits[k] for k in ("train", "val", "calib", "test") if k in splits}
        info["dropped_lines"] = dropped_by_split(feats, order)
        return DataBundle(dataset=entry.name if entry else str(data.path), modality=self.name,
                          task=task, splits=order, input_spec=spec, info=info)

    @staticmethod
    def _log_issues(issues: list[dict[str, Any]]) -> None:
        if not issues:
            return
        counts = count_dropped(issues)
        examples = "; ".join(f"{i['source']}:{i['line']} {i['reason']}" for i in issues[:3])
        logger.warning("%d lines of the stay files were left out (%s); e.g. %s",
                       counts["total"], ", ".join(f"{DROP_REASONS.get(k, k)}: {v}" for k, v in
                                                  list(counts["by_reason"].items())[:6]),
                       examples)

    @staticmethod
    def _split(name: str, ids: list[str], row: dict[str, int], feats: dict[str, Any],
               outcomes: pd.DataFrame, task: Any) -> Split:
        idx = np.asarray([row[r] for r in ids], dtype=int)
        out = outcomes.loc[ids]
        static = feats["static"][idx] if len(idx) else np.zeros((0, 4))
        meta = pd.DataFrame({
            "sex": pd.Series(static[:, 1]).map({1.0: "male", 0.0: "female"}).fillna("unknown"),
            "age_band": [age_band(a) for a in static[:, 0]],
            "icu_type": [ICU_TYPES.get(int(t), "unknown") if not np.isnan(t) else "unknown"
                         for t in static[:, 3]],
            "saps_i": out["saps_i"].to_numpy(dtype=float),
            "sofa": out["sofa"].to_numpy(dtype=float),
            "hours": feats["hours"][idx],
        })
        targets = np.asarray([task.encode(int(v), sample_id=r) for v, r in
                              zip(out["in_hospital_death"], ids, strict=True)])
        return Split(name=name, inputs=idx, targets=targets, ids=list(ids), metadata=meta)

    @staticmethod
    def _input_spec(stats: dict[str, Any], opts: Options) -> dict[str, Any]:
        names = series_variables()
        lay = layout(len(names))
        return {
            "format": "physionet2012-hourly", "feature_version": FEATURE_VERSION,
            "variables": names, "static": list(STATIC_NAMES), "layout": lay,
            "channels": lay["valid"][1], "length": BINS, "bin_hours": 1, "window_hours": BINS,
            "stats": stats, "mapping_table_sha256": mapping_table_sha256(),
            "on_malformed": opts.on_malformed, "min_train_hours": opts.truncate_min_hours,
            "truncate_probability": opts.truncate_probability,
            "risk_bands": {"low_below": 0.10, "high_from": 0.30},
        }

    @staticmethod
    def _info(entry: Any, feats: dict[str, Any], lists: dict[str, list[str]],
              outcomes: pd.DataFrame) -> dict[str, Any]:
        wanted = [r for ids in lists.values() for r in ids]
        return {
            "source": "PhysioNet/CinC Challenge 2012 (set-a + set-b)",
            "license": getattr(entry, "license", "ODC-By 1.0"),
            "citation": getattr(entry, "citation", "Silva et al., CinC 2012"),
            "excluded_no_observations": list(feats["empty"]),
            "saps_i_missing": int(outcomes.loc[wanted, "saps_i"].isna().sum()),
            "notes": "calib carved from train; normalisation fitted on train only; stays with "
                     "no observation cannot be assessed and are left out",
        }

    # ---------------------------------------------------------------- reading
    def _stay(self, source: Any, on_malformed: Any) -> tuple[Stay, str]:
        if isinstance(source, dict) and "resourceType" not in source \
                and isinstance(source.get("data"), bytes | bytearray):  # an uploaded file
            data = bytes(source["data"])
            if data.lstrip()[:1] == b"{":
                return stay_from_fhir(data, on_malformed), "fhir"
            with tempfile.TemporaryDirectory(prefix="meddx-ehr-") as tmp:
                p = Path(tmp) / "upload.txt"  # never the client's name (it may name a patient)
                p.write_bytes(data)
                return read_physionet_stay(p, on_malformed), "physionet2012"
        if isinstance(source, dict | bytes):
            return stay_from_fhir(source, on_malformed), "fhir"
        if isinstance(source, str) and source.lstrip().startswith("{"):
            return stay_from_fhir(source, on_malformed), "fhir"
        if isinstance(source, str | Path):
            p = Path(source)
            if not p.is_file():
                raise DataError("no such file", path=str(p))
            if p.suffix.lower() == ".json":
                return stay_from_fhir(p, on_malformed), "fhir"
            return read_physionet_stay(p, on_malformed), "physionet2012"
        raise DataError(f"cannot read an ICU stay from {type(source).__name__}",
                        hint="give a PhysioNet 2012 .txt file, a FHIR Bundle (dict or .json) "
                        "or a CDS Hooks prefetch dict")

    def read(self, source: Any, input_spec: dict[str, Any]) -> Sample:
        """One stay → :class:`Sample` with tensor ``(C, 48)``.

        ``source``: a PhysioNet 2012 stay file; a FHIR R4B Bundle (dict, JSON text or
        ``.json`` path); or a CDS Hooks prefetch ``{"patient": Patient, "encounter": Encounter,
        "observations": Bundle}`` (optional ``"prediction_time"``). ``meta`` states
        ``hours_used``, ``last_observation_hours``, ``n_observations``, ``ignored`` (items
        left out, with reasons), ``basis`` (FHIR Observations used), ``patient``,
        ``encounter``, and ``below_training_minimum`` when fewer hours than in training.

        Raises:
            DataError: unreadable source, no Patient/Encounter, or no observation at all
                ("cannot assess" — never a risk of 0).
        """
        self._check_spec(input_spec)
        if isinstance(source, np.ndarray | torch.Tensor):
            return self._encoded(source, input_spec)
        stay, kind = self._stay(source, input_spec.get("on_malformed", "warn"))
        try:
            b = bin_stay(stay, int(input_spec.get("length", BINS)))
        except DataError as e:
            raise _refusal(e, stay) from e
        x = encode(b.values, b.static, b.hours, input_spec["stats"])
        used_minutes = [stay.events[i][0] for i in b.used]
        ignored = [i.to_dict() for i in (*stay.issues, *b.outside)]
        meta: dict[str, Any] = {
            "source_format": kind,
            "hours_used": int(b.hours),
            "last_observation_hours": round(max(used_minutes) / 60.0, 2),
            "n_observations": len(b.used),
            "ignored": ignored,
            "n_ignored": len(ignored),
            "dropped_lines": count_dropped([*stay.issues, *b.outside]),
            "below_training_minimum": b.hours < int(input_spec.get("min_train_hours", 6)),
        }
        if stay.basis:
            meta["basis"] = [stay.basis[i] for i in b.used if i < len(stay.basis)]
        for key, value in (("patient", stay.patient_ref), ("encounter", stay.encounter_ref)):
            if value:
                meta[key] = value
        missing = [k for k, v in (("age", stay.age), ("sex", stay.sex),
                                  ("ICU type", stay.icu_type)) if v is None]
        if missing:
            meta["missing_descriptors"] = missing
        return Sample(id=stay.record_id, tensor=torch.from_numpy(x), meta=meta)

    @staticmethod
    def _encoded(x: Any, spec: dict[str, Any]) -> Sample:
        """An already encoded stay ``(C, T)`` (e.g. from a split), checked for shape."""
        t = torch.as_tensor(np.asarray(x, dtype=np.float32))
        want = (int(spec["channels"]), int(spec["length"]))
        if tuple(t.shape) != want:
            raise InputMismatchError(f"an encoded stay must have shape {want}, got "
                                     f"{tuple(t.shape)}",
                                     hint="give a stay file, a FHIR Bundle or a CDS prefetch")
        hours = int(t[spec["layout"]["valid"][0]].sum())
        if hours == 0 or not bool(t[spec["layout"]["masks"][0]:spec["layout"]["masks"][1]].any()):
            raise DataError("cannot assess: the stay has no observations")
        return Sample(id="stay", tensor=t, meta={"source_format": "tensor", "hours_used": hours})

    @staticmethod
    def _check_spec(spec: dict[str, Any]) -> None:
        if spec.get("format") != "physionet2012-hourly":
            raise InputMismatchError("this model was not trained on ICU stays",
                                     hint=f"its preprocessing format is {spec.get('format')!r}")
        if spec.get("variables") != series_variables():
            raise InputMismatchError(
                "the model's variables differ from this meddx mapping table",
                hint="use the meddx version the model was trained with")

    def item_tensor(self, item: Any, input_spec: dict[str, Any]) -> torch.Tensor:
        return torch.as_tensor(np.asarray(item, dtype=np.float32))

    def transforms(self, train: bool, input_spec: dict[str, Any], augment: Any
                   ) -> Callable | None:
        if not train or (augment is not None and not getattr(augment, "enabled", True)):
            return None
        return RandomTruncation(input_spec["layout"], int(input_spec.get("min_train_hours", 6)),
                                float(input_spec.get("truncate_probability", 0.5)))

    # ----------------------------------------------------------------- models
    def default_network(self, task: Any, input_spec: dict[str, Any]
                        ) -> tuple[str, dict[str, Any]]:
        return "grud", {"hidden": 64, "dropout": 0.3, "pooling": "mean_max", "wide": True}

    def network_spec(self, input_spec: dict[str, Any]) -> dict[str, Any]:
        return {"spatial_dims": 1, "in_channels": int(input_spec["channels"]),
                "size": int(input_spec["length"]), "n_vars": len(input_spec["variables"]),
                "n_static": len(input_spec["static"])}

    def read_external(self, data: Path, input_spec: dict[str, Any], task: Any
                      ) -> tuple[list[Any], list[Any], list[str], dict[str, Any]]:
        """External ICU stays for ``meddx validate``: a folder in the PhysioNet 2012 layout
        (stay files + ``Outcomes*.txt``). Dropped lines are counted by reason, per kept stay and
        for the refused ones (never silently)."""
        from collections import Counter

        root = data
        from meddx.modalities.ehr.io import (
            DROP_REASONS,
            count_dropped,
            read_outcomes,
            read_physionet_stay,
            stay_files,
        )

        if not root.is_dir():
            raise DataError("external ICU data must be a folder of PhysioNet 2012 stay files with "
                            "an Outcomes file", path=str(root))
        outcome_files = sorted(root.rglob("Outcomes*.txt"))
        if not outcome_files:
            raise DataError("no Outcomes*.txt in the external data folder", path=str(root),
                            hint="the outcomes file gives the labels (RecordID,…,In-hospital_death)")
        outcomes, files = read_outcomes(outcome_files), stay_files(root)
        modality, spec = self, input_spec
        tensors, targets, ids, kept, refused = [], [], [], [], []
        no_outcome = sorted(set(files) - set(outcomes.index), key=int)
        for rid in sorted(set(files) & set(outcomes.index), key=int):
            try:
                sample = modality.read(files[rid], spec)
            except DataError:
                stay = read_physionet_stay(files[rid], "warn")
                refused.append(count_dropped(stay.issues)["by_reason"])
                continue
            tensors.append(sample.tensor)
            targets.append(task.encode(int(outcomes.loc[rid, "in_hospital_death"]), sample_id=rid))
            ids.append(rid)
            kept.append(sample.meta.get("dropped_lines", {}).get("by_reason", {}))
        by_split, refused_t = {"external": _tally(kept)}, _tally(refused)
        total: Counter[str] = Counter()
        for t in (by_split["external"], refused_t):
            total.update(t["by_reason"])
        info = {"source": str(root), "format": "PhysioNet/CinC 2012 stay files",
                "stays_without_outcome": len(no_outcome),
                "outcomes_without_stay": int(len(set(outcomes.index) - set(files))),
                "dropped_lines": {"total": int(sum(total.values())),
                                  "by_reason": dict(total.most_common()), "by_split": by_split,
                                  "refused_stays": refused_t,
                                  "reasons": {k: DROP_REASONS.get(k, k) for k in total}}}
        return tensors, targets, ids, info

    def explainer(self, model: torch.nn.Module, input_spec: dict[str, Any], **options: Any
                  ) -> Any:
        """:class:`~meddx.modalities.ehr.explain.EHRExplainer`: ``explain(sample)`` →
        (findings in words, attributions ``(C, T)``)."""
        from meddx.modalities.ehr.explain import EHRExplainer

        options.pop("task", None)  # a binary model always explains the risk of death
        options.pop("network", None)
        return EHRExplainer(model, input_spec, **options)

    def to_fhir(self, prediction: Any, card: Any) -> dict[str, Any]:
        """An R4B RiskAssessment (dict); see :func:`meddx.modalities.ehr.fhir.risk_assessment`."""
        return risk_assessment(prediction, card)


def _tally(per_case: list[dict[str, int]]) -> dict[str, Any]:
    from collections import Counter

    counts: Counter[str] = Counter()
    for c in per_case:
        counts.update(c)
    return {"stays": len(per_case), "stays_with_dropped_lines": sum(1 for c in per_case if c),
            "lines": int(sum(counts.values())), "by_reason": dict(counts.most_common())}
