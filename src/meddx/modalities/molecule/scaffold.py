"""DeepChem's deterministic Bemis–Murcko scaffold split: molecules are grouped by scaffold, the
largest groups fill train, the next ones val, the rest test, so no scaffold lands on two sides
(Chemprop's own scaffold split shuffles the groups; this one does not)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from meddx.errors import ConfigError, DataError

__all__ = ["scaffold_groups", "scaffold_of", "scaffold_split"]


def scaffold_of(mol: object, include_chirality: bool = False) -> str:
    """Bemis–Murcko scaffold SMILES of an RDKit molecule ('' for acyclic molecules)."""
    from rdkit.Chem.Scaffolds import MurckoScaffold

    return MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=include_chirality)


def scaffold_groups(scaffolds: Sequence[str]) -> list[list[int]]:
    """Indices grouped by scaffold, largest group first (ties: DeepChem's order).

    DeepChem sorts ``(len(group), group[0])`` in reverse, so among equal sizes the group whose
    first member comes later in the file goes first; we keep that for comparability.
    """
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(scaffolds):
        groups.setdefault(s, []).append(i)
    return sorted(groups.values(), key=lambda g: (len(g), g[0]), reverse=True)


def scaffold_split(scaffolds: Sequence[str], fractions: Sequence[float]
                   ) -> list[np.ndarray]:
    """Deterministic scaffold split into ``len(fractions)`` parts (DeepChem's ScaffoldSplitter).

    Groups are taken largest first; each goes to the first part whose cumulative cut-off it
    does not overflow, else to the last part (exactly DeepChem's rule, so a small group may
    still join train after a larger one overflowed it). Deterministic: no seed.

    Args:
        scaffolds: one scaffold string per sample.
        fractions: shares per part, summing to 1 (e.g. ``[0.8, 0.1, 0.1]``).

    Returns:
        Sorted index arrays, one per part.
    """
    if abs(sum(fractions) - 1) > 1e-6 or any(f < 0 for f in fractions):
        raise ConfigError(f"split fractions must be >= 0 and sum to 1, got {list(fractions)}")
    n = len(scaffolds)
    if n == 0:
        raise DataError("cannot split an empty dataset")
    cutoffs = np.cumsum(fractions)[:-1] * n
    parts: list[list[int]] = [[] for _ in fractions]
    for group in scaffold_groups(scaffolds):
        target, before = len(parts) - 1, 0
        for k, cut in enumerate(cutoffs):
            before += len(parts[k])
            if before + len(group) <= cut:
                target = k
                break
        parts[target].extend(group)
    return [np.sort(np.asarray(p, dtype=int)) for p in parts]
