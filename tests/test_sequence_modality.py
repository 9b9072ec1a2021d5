"""Sequence datasets: catalog entries, splits (calib from train, k-fold), bad tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import require_data
from meddx.catalog import get_entry
from meddx.config import DataConfig
from meddx.errors import ConfigError, DataError
from meddx.modalities import get_modality
from meddx.models import build_network
from meddx.tasks import TaskSpec

TASK = TaskSpec(kind="binary", class_names=["neg", "pos"], positive_class="pos")


def _ids(bundle) -> dict[str, set[str]]:
    return {k: set(s.ids) for k, s in bundle.splits.items()}


def test_splice_loads_three_classes_of_60_nt_with_disjoint_splits() -> None:
    require_data("genomics/splice.csv")
    mod = get_modality("sequence")
    b = mod.load(DataConfig(dataset="splice"), get_entry("splice"), None, seed=0)
    assert b.task.class_names == ["EI", "IE", "N"]
    assert b.input_spec["length"] == 60 and b.input_spec["channels"] == 4
    assert list(b.splits) == ["train", "val", "calib", "test"]
    assert sum(len(s) for s in b.splits.values()) == 3190
    ids = _ids(b)
    names = list(ids)
    for i, a in enumerate(names):
        for c in names[i + 1:]:
            assert not ids[a] & ids[c], f"{a} and {c} overlap"
    # calib is carved from train: with calib_fraction 0 the train split holds calib's samples
    b0 = mod.load(DataConfig(dataset="splice", calib_fraction=0.0), get_entry("splice"), None, 0)
    assert ids["calib"] <= set(b0.splits["train"].ids)
    assert _ids(b0)["test"] == ids["test"] and _ids(b0)["val"] == ids["val"]
    x = mod.item_tensor(b.splits["train"].inputs[0], b.input_spec)
    net = build_network("seq_cnn", num_outputs=3, spec=mod.network_spec(b.input_spec))
    assert net(x.unsqueeze(0)).shape == (1, 3)


def test_promoter_folds_test_every_sequence_exactly_once() -> None:
    require_data("genomics/promoters.data")
    mod = get_modality("sequence")
    tested: list[str] = []
    for fold in range(5):
        data = DataConfig(dataset="promoters", options={"folds": 5, "fold": fold})
        b = mod.load(data, get_entry("promoters"), None, seed=fold)  # run seed must not matter
        assert b.task.positive_class == "promoter" and b.input_spec["length"] == 57
        assert "cross-validation" in b.info["split"]
        tested += b.splits["test"].ids
        assert not set(b.splits["test"].ids) & set(b.splits["train"].ids)
    assert sorted(tested) == sorted(set(tested)) and len(tested) == 106


def _table(tmp_path: Path, rows: list[tuple[str, str]], header: str = "sequence,label") -> Path:
    p = tmp_path / "seqs.csv"
    p.write_text(header + "\n" + "\n".join(f"{s},{y}" for s, y in rows) + "\n")
    return p


def test_user_table_with_missing_label_column_is_a_data_error(tmp_path: Path) -> None:
    p = _table(tmp_path, [("ACGT", "pos")] * 8, header="sequence,class")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['label'\]") as e:
        get_modality("sequence").load(DataConfig(path=str(p)), None, TASK, 0)
    assert "columns present" in e.value.hint


def test_user_table_errors_name_the_sequence(tmp_path: Path) -> None:
    mod = get_modality("sequence")
    rows = [("ACGTAC", "pos"), ("ACGTAA", "neg")] * 6
    bad_char = _table(tmp_path, [*rows, ("ACG-AC", "pos")])
    with pytest.raises(DataError, match="row13"):
        mod.load(DataConfig(path=str(bad_char)), None, TASK, 0)
    ragged = _table(tmp_path, [*rows, ("ACGTACGT", "pos")])
    with pytest.raises(DataError, match="differ from the common length 6"):
        mod.load(DataConfig(path=str(ragged)), None, TASK, 0)
    unknown = _table(tmp_path, [*rows, ("ACGTAC", "maybe")])
    with pytest.raises(DataError, match="'maybe' is not one of"):
        mod.load(DataConfig(path=str(unknown)), None, TASK, 0)
    with pytest.raises(ConfigError, match="scaffold"):
        mod.load(DataConfig(path=str(_table(tmp_path, rows)), split="scaffold"), None, TASK, 0)


def test_fasta_training_data_with_labels_csv(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    seqs = ["".join(rng.choice(list("ACGT"), 10)) for _ in range(20)]
    (tmp_path / "s.fa").write_text("".join(f">r{i}\n{s}\n" for i, s in enumerate(seqs)))
    (tmp_path / "labels.csv").write_text(
        "id,label\n" + "".join(f"r{i},{'pos' if i % 2 else 'neg'}\n" for i in range(20)))
    data = DataConfig(path=str(tmp_path / "s.fa"), options={"labels_csv": "labels.csv",
                                                           "reverse_complement": True})
    b = get_modality("sequence").load(data, None, TASK, 0)
    assert b.input_spec["length"] == 10 and b.input_spec["reverse_complement"] is True
    assert sum(len(s) for s in b.splits.values()) == 20
    assert get_modality("sequence").transforms(True, b.input_spec, None) is not None
    assert get_modality("sequence").transforms(False, b.input_spec, None) is None


def test_seq_models_take_their_length_and_options() -> None:
    import torch

    spec = {"spatial_dims": 1, "in_channels": 4, "size": 57, "length": 57}
    x = torch.zeros(2, 4, 57)
    for name, options in [("seq_cnn", {}), ("seq_cnn", {"global_pool": True, "pools": [1, 1, 1]}),
                          ("seq_cnn_gru", {})]:
        net = build_network(name, num_outputs=3, spec=spec, options=options)
        assert net(x).shape == (2, 3)
    with pytest.raises(ConfigError, match="too short"):
        build_network("seq_cnn", num_outputs=1, spec={**spec, "size": 3, "length": 3})
    with pytest.raises(ConfigError, match="does not accept"):
        build_network("seq_cnn", num_outputs=1, spec=spec, options={"filterz": [8]})
