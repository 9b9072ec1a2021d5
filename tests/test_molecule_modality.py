"""Molecule datasets: dropped-row reporting, strict mode, random and scaffold splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import require_data
from meddx.catalog import get_entry
from meddx.config import DataConfig
from meddx.errors import DataError
from meddx.modalities import get_modality
from meddx.modalities.molecule.scaffold import scaffold_split
from meddx.tasks import TaskSpec

TOX21_BAD_LINES = [1324, 2292, 2299, 3560, 4567, 4651, 5540, 6725]
BINARY = TaskSpec(kind="binary", class_names=["inactive", "active"], label_values=[0, 1],
                  positive_class="active")


@pytest.fixture(scope="module")
def tox21_scaffold():
    require_data("molecules/tox21.csv")
    data = DataConfig(dataset="tox21", split="scaffold", val_fraction=0.1, test_fraction=0.1)
    return get_modality("molecule").load(data, get_entry("tox21"), None, seed=0)


@pytest.mark.slow  # parses all 7,831 Tox21 SMILES (~2 s on an idle core)
def test_tox21_drops_and_reports_the_8_invalid_smiles(tox21_scaffold) -> None:
    dropped = tox21_scaffold.info["dropped"]
    assert dropped["count"] == 8 and dropped["rows"] == TOX21_BAD_LINES
    assert all("sanitisation" in r or "syntax" in r for r in dropped["reasons"])
    assert tox21_scaffold.info["n_molecules"] == 7831
    assert sum(len(s) for s in tox21_scaffold.splits.values()) == 7831 - 8
    assert tox21_scaffold.task.kind == "multilabel" and tox21_scaffold.task.num_classes == 12
    t = tox21_scaffold.splits["train"].targets
    assert t.shape[1] == 12 and np.isnan(t).any()  # missing labels kept as NaN (masked)


@pytest.mark.slow
def test_scaffold_split_is_scaffold_disjoint_and_deterministic(tox21_scaffold) -> None:
    splits = tox21_scaffold.splits
    assert list(splits) == ["train", "val", "calib", "test"]
    scaffolds = {k: set(s.metadata["scaffold"]) for k, s in splits.items()}
    names = list(scaffolds)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not scaffolds[a] & scaffolds[b], f"{a} and {b} share scaffolds"
    n = sum(len(s) for s in splits.values())
    assert abs(len(splits["test"]) / n - 0.1) < 0.01
    # the run seed does not change a scaffold split
    again = get_modality("molecule").load(
        DataConfig(dataset="tox21", split="scaffold", val_fraction=0.1, test_fraction=0.1),
        get_entry("tox21"), None, seed=123)
    for k in splits:
        assert again.splits[k].ids == splits[k].ids


def test_scaffold_split_follows_deepchems_rule() -> None:
    # groups by size: a×4, b×3, c×2, d×1 → 80/10/10 of 10: a+b (7) to train, c would overflow
    # train (9 > 8) and val (9 > 9? no: 7+0+2 = 9 ≤ 9) → val, d fits train again (8 ≤ 8)
    scaffolds = list("aaaabbbccd")
    tr, va, te = scaffold_split(scaffolds, [0.8, 0.1, 0.1])
    assert tr.tolist() == [0, 1, 2, 3, 4, 5, 6, 9] and va.tolist() == [7, 8] and te.size == 0


def _csv(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "mols.csv"
    p.write_text(text)
    return p


GOOD = "".join(f"{s},{i % 2}\n" for i, s in enumerate(
    ["CCO", "CCN", "CCC", "c1ccccc1", "c1ccccc1O", "c1ccccc1N", "CC(=O)O", "CCOC", "C1CCCCC1",
     "C1CCNCC1", "OCCO", "CCCl", "CCBr", "c1ccncc1", "CC(C)O", "CCCC"]))


def test_user_csv_invalid_rows_dropped_or_strict_error(tmp_path: Path) -> None:
    p = _csv(tmp_path, "smiles,label\n" + GOOD + "C1CC,1\n*,0\n,1\nCCO,\n")
    mod = get_modality("molecule")
    b = mod.load(DataConfig(path=str(p)), None, BINARY, 0)
    d = b.info["dropped"]
    assert d["count"] == 3 and d["rows"] == [18, 19, 20]
    assert d["unlabelled_rows"] == [21]
    assert sum(len(s) for s in b.splits.values()) == 16
    with pytest.raises(DataError, match=r"3 invalid SMILES.*line 18: 'C1CC'"):
        mod.load(DataConfig(path=str(p), options={"strict": True}), None, BINARY, 0)


def test_missing_label_or_smiles_columns_are_named(tmp_path: Path) -> None:
    mod = get_modality("molecule")
    p = _csv(tmp_path, "smiles,activity\n" + GOOD)
    with pytest.raises(DataError, match=r"lacks column\(s\) \['label'\]") as e:
        mod.load(DataConfig(path=str(p)), None, BINARY, 0)
    assert "activity" in e.value.hint
    with pytest.raises(DataError, match=r"\['SMILES'\]"):
        mod.load(DataConfig(path=str(p), options={"smiles_column": "SMILES",
                                                 "label_columns": ["activity"]}), None, BINARY, 0)
    bad = _csv(tmp_path, "smiles,label\n" + GOOD + "CCO,2\n")
    with pytest.raises(DataError, match="not one of"):
        mod.load(DataConfig(path=str(bad)), None, BINARY, 0)


def test_random_split_is_stratified_and_calib_comes_from_train(tmp_path: Path) -> None:
    p = _csv(tmp_path, "smiles,label\n" + GOOD * 3)
    mod = get_modality("molecule")
    b = mod.load(DataConfig(path=str(p)), None, BINARY, 0)
    b0 = mod.load(DataConfig(path=str(p), calib_fraction=0.0), None, BINARY, 0)
    assert set(b.splits["calib"].ids) <= set(b0.splits["train"].ids)
    assert b.splits["test"].ids == b0.splits["test"].ids
    for s in b.splits.values():
        assert set(s.targets.tolist()) == {0, 1}
