"""Splitting datasets that ship without a fixed split (shared by the modality folders).

* :func:`random_split` — stratified random train / val / test indices.
* :func:`kfold_split` — the test fold of a stratified k-fold partition (cross-validation of small
  sets such as the 106 E. coli promoters).
* :func:`by_group` — whole groups (e.g. patients, or a domain's own grouping key) to one side.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from meddx.errors import ConfigError, DataError

__all__ = [
    "SPLIT_NAMES",
    "Split",
    "carve_split",
    "random_split",
    "kfold_split",
    "limit_indices",
    "by_group",
    "unique_ids",
]

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "calib", "test")


@dataclass
class Split:
    """One split of a dataset.

    Attributes:
        name: ``train``, ``val``, ``calib`` or ``test`` (or another named evaluation split).
        inputs: indexable items the modality turns into tensors (an array (N, …), a list of
            paths, SMILES strings …).
        targets: encoded targets (see :meth:`TaskSpec.encode`), aligned with ``inputs``.
        ids: one identifier per sample (file name, record name), never PHI.
        patient_ids: patient identifier per sample where known (splits are by patient then).
        metadata: one row per sample (sex, age, site …) for subgroup analysis, or None.
    """

    name: str
    inputs: Any
    targets: np.ndarray
    ids: list[str]
    patient_ids: list[str] | None = None
    metadata: pd.DataFrame | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        if len(self.targets) != n or len(self.inputs) != n:
            raise DataError(
                f"split '{self.name}' is inconsistent: {len(self.inputs)} inputs, "
                f"{len(self.targets)} targets, {n} ids"
            )
        if self.metadata is not None and len(self.metadata) != n:
            raise DataError(f"split '{self.name}': metadata rows do not match samples")

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: Sequence[int] | np.ndarray, name: str | None = None) -> Split:
        """The samples at ``index`` as a new split."""
        idx = np.asarray(index, dtype=int)
        if isinstance(self.inputs, np.ndarray | torch.Tensor):
            inputs = self.inputs[idx]
        else:
            inputs = [self.inputs[i] for i in idx]
        return Split(
            name=name or self.name,
            inputs=inputs,
            targets=np.asarray(self.targets)[idx],
            ids=[self.ids[i] for i in idx],
            patient_ids=[self.patient_ids[i] for i in idx] if self.patient_ids else None,
            metadata=self.metadata.iloc[idx].reset_index(drop=True)
            if self.metadata is not None
            else None,
        )


def carve_split(
    split: Split,
    fraction: float,
    seed: int,
    stratify: np.ndarray | None,
    name: str,
    rest_name: str | None = None,
) -> tuple[Split, Split]:
    """Carve ``fraction`` of ``split`` into a new split called ``name``.

    Stratified by ``stratify`` (class index per sample) and grouped by patient when the split
    has patient ids, so no patient lands on both sides. Deterministic for a given ``seed``.

    Returns:
        (rest, carved)
    """
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    n = len(split)
    if not 0 < fraction < 1:
        raise ConfigError(f"split fraction must be in (0, 1), got {fraction}")
    if n < 4:
        raise DataError(f"split '{split.name}' has only {n} samples; too few to carve '{name}'")
    idx = np.arange(n)
    if split.patient_ids:
        groups = np.asarray(split.patient_ids)
        k = max(2, round(1 / fraction))
        y = stratify if stratify is not None else np.zeros(n, dtype=int)
        folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        rest, carved = next(iter(folds.split(idx, y, groups)))
    else:
        strat = stratify
        if strat is not None:
            counts = np.bincount(np.asarray(strat, dtype=int))
            if (counts[counts > 0] < 2).any():
                strat = None  # a class with one sample cannot be stratified
        rest, carved = train_test_split(idx, test_size=fraction, random_state=seed, stratify=strat)
    rest, carved = np.sort(rest), np.sort(carved)
    return split.subset(rest, rest_name or split.name), split.subset(carved, name)


def _usable_strata(strat: np.ndarray | None, n_parts: int) -> np.ndarray | None:
    if strat is None:
        return None
    counts = np.bincount(np.asarray(strat, dtype=int))
    # every present class needs a member on each side; otherwise fall back to plain random
    return None if (counts[counts > 0] < n_parts).any() else strat


def random_split(n: int, strat: np.ndarray | None, val_fraction: float, test_fraction: float,
                 seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified random split of ``n`` samples into sorted train / val / test indices.

    Args:
        n: number of samples.
        strat: class index per sample (None: not stratified, e.g. multilabel).
        val_fraction / test_fraction: shares of the whole set (test may be 0).
        seed: random state.
    """
    from sklearn.model_selection import train_test_split

    if val_fraction <= 0 or val_fraction + test_fraction >= 1:
        raise ConfigError(
            f"val_fraction ({val_fraction}) must be > 0 and val + test ({test_fraction}) < 1")
    idx = np.arange(n)
    rest, test = idx, np.array([], dtype=int)
    if test_fraction > 0:
        s = _usable_strata(strat, 3)
        rest, test = train_test_split(idx, test_size=test_fraction, random_state=seed,
                                      stratify=s)
    s = _usable_strata(None if strat is None else np.asarray(strat)[rest], 2)
    train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction),
                                  random_state=seed, stratify=s)
    return np.sort(train), np.sort(val), np.sort(test)


def kfold_split(n: int, strat: np.ndarray | None, folds: int, fold: int, val_fraction: float,
                seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fold ``fold`` of a stratified ``folds``-fold partition as test; val carved from the rest.

    The partition depends only on ``seed`` (fixed across folds), so looping ``fold`` over
    ``range(folds)`` tests every sample exactly once.
    """
    from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

    if folds < 2 or not 0 <= fold < folds:
        raise ConfigError(f"cross-validation needs folds >= 2 and 0 <= fold < folds; got "
                          f"folds={folds}, fold={fold}")
    idx = np.arange(n)
    s = _usable_strata(strat, folds)
    splitter = (StratifiedKFold(folds, shuffle=True, random_state=seed) if s is not None
                else KFold(folds, shuffle=True, random_state=seed))
    rest, test = list(splitter.split(idx, s if s is not None else None))[fold]
    s2 = _usable_strata(None if strat is None else np.asarray(strat)[rest], 2)
    train, val = train_test_split(rest, test_size=val_fraction, random_state=seed, stratify=s2)
    return np.sort(train), np.sort(val), np.sort(test)


def by_group(keys: Sequence[str], strat: np.ndarray | None,
             split_fn: Callable[[int, np.ndarray | None], tuple[np.ndarray, ...]]
             ) -> tuple[np.ndarray, ...]:
    """Apply an index splitter to groups of equal ``keys`` (e.g. identical sequences), so that
    duplicates never straddle two splits; returns sorted sample indices per part.

    Args:
        keys: one key per sample; samples with the same key form a group.
        strat: class index per sample (a group is stratified by its first member's class).
        split_fn: ``(n_groups, group_strata) -> index arrays over groups``.
    """
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    members = list(groups.values())
    first = np.asarray([m[0] for m in members])
    parts = split_fn(len(members), None if strat is None else np.asarray(strat)[first])
    return tuple(np.sort(np.asarray([i for g in part for i in members[g]], dtype=int))
                 for part in parts)


def unique_ids(ids: Sequence[str]) -> list[str]:
    """Make identifiers unique by suffixing repeats (``x``, ``x#2``, ``x#3`` …)."""
    seen: dict[str, int] = {}
    out = []
    for i in ids:
        seen[i] = seen.get(i, 0) + 1
        out.append(i if seen[i] == 1 else f"{i}#{seen[i]}")
    return out


def limit_indices(idx: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """At most ``limit`` of ``idx``, drawn at random (sorted), for quick runs."""
    if not limit or len(idx) <= limit:
        return idx
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(idx, size=limit, replace=False))
