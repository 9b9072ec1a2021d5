"""Folder-of-images datasets (labels CSV) and the bundled ISIC 2017 set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import require_data
from meddx.catalog import get_entry, resolve
from meddx.errors import ConfigError, DataError
from meddx.modalities.image.folder import (
    ISIC2017_TASK,
    load_folder_dataset,
    load_isic2017,
)
from meddx.modalities.image.io import read_image, to_model_grid
from meddx.tasks import TaskSpec

SPEC = {"channels": 1, "spatial_dims": 2, "size": 16, "normalize": "dtype-range"}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """40 tiny PNGs from 10 patients (4 images each), two classes, age and site metadata."""
    rng = np.random.default_rng(1)
    rows = []
    (tmp_path / "img").mkdir()
    for i in range(40):
        patient = f"p{i // 4:02d}"
        label = "disease" if (i // 4) % 2 else "healthy"
        name = f"img/{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / name)
        rows.append({"path": name, "label": label, "patient_id": patient,
                     "age": str(20 + i) if i % 7 else "unknown", "site": f"s{i % 3}"})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path


def _patients(split) -> set[str]:
    return set(split.patient_ids)


def test_split_by_patient_never_by_image(folder: Path) -> None:
    splits, info = load_folder_dataset(folder, task_kind="binary", positive_class="disease",
                                       seed=3, val_fraction=0.2, test_fraction=0.2,
                                       calib_fraction=0.25)
    assert list(splits) == ["train", "val", "calib", "test"]
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not _patients(splits[a]) & _patients(splits[b]), (a, b)
    assert sum(len(s) for s in splits.values()) == 40
    assert info["patient_level_split"] and info["task"]["class_names"] == ["disease", "healthy"]
    # metadata stays aligned with its image; "unknown" age is missing, not a number
    meta = splits["train"].metadata
    assert list(meta.columns) == ["age", "site"] and meta["age"].dtype == float
    for sid, age in zip(splits["train"].ids, meta["age"], strict=True):
        i = int(Path(sid).stem)
        assert np.isnan(age) if i % 7 == 0 else age == 20 + i
    # binary targets: 1 = the named positive class
    train = splits["train"]
    assert all(t == (1 if int(Path(s).stem) // 4 % 2 else 0)
               for s, t in zip(train.ids, train.targets, strict=True))


def test_split_column_is_honoured_and_calib_comes_from_train(folder: Path) -> None:
    frame = pd.read_csv(folder / "labels.csv")
    frame["split"] = ["test" if int(p[1:]) >= 8 else "train" for p in frame["patient_id"]]
    frame.to_csv(folder / "labels.csv", index=False)
    splits, info = load_folder_dataset(folder, task_kind="binary", positive_class="disease",
                                       calib_fraction=0.25, val_fraction=0.25)
    assert _patients(splits["test"]) == {"p08", "p09"}
    train_rows = set(frame.loc[frame["split"] == "train", "path"])
    for name in ("train", "val", "calib"):
        assert set(splits[name].ids) <= train_rows
    assert "split column" in info["split_method"]


def test_bad_split_values_and_patients_across_splits(folder: Path) -> None:
    frame = pd.read_csv(folder / "labels.csv")
    frame["split"] = "train"
    frame.loc[0, "split"] = "calib"
    frame.to_csv(folder / "labels.csv", index=False)
    with pytest.raises(DataError, match="split 'calib'") as err:
        load_folder_dataset(folder, task_kind="binary", positive_class="disease")
    assert "carved from train" in err.value.hint
    frame.loc[0, "split"] = "test"  # p00's other images stay in train
    frame.to_csv(folder / "labels.csv", index=False)
    with pytest.raises(DataError, match="its patient also has images"):
        load_folder_dataset(folder, task_kind="binary", positive_class="disease")


def test_missing_file_names_row_and_path(folder: Path) -> None:
    (folder / "img" / "005.png").unlink()
    with pytest.raises(DataError, match="row 7 .* img/005.png") as err:
        load_folder_dataset(folder)
    assert err.value.context["path"].endswith("img/005.png")


def test_label_outside_the_task_names_the_sample(folder: Path) -> None:
    task = TaskSpec(kind="binary", class_names=["healthy", "disease"], positive_class="disease")
    frame = pd.read_csv(folder / "labels.csv")
    frame.loc[3, "label"] = "Disease "  # near-miss: never coerced
    frame.to_csv(folder / "labels.csv", index=False)
    with pytest.raises(DataError, match="'Disease'") as err:
        load_folder_dataset(folder, task=task)
    assert err.value.context["sample_id"] == "img/003.png"
    frame.loc[3, "label"] = ""
    frame.to_csv(folder / "labels.csv", index=False)
    with pytest.raises(DataError, match="empty label"):
        load_folder_dataset(folder, task=task)


def test_csv_problems(folder: Path, tmp_path: Path) -> None:
    pd.DataFrame({"file": ["a.png"], "y": [1]}).to_csv(folder / "bad.csv", index=False)
    with pytest.raises(DataError, match="lacks column"):
        load_folder_dataset(folder, "bad.csv")
    with pytest.raises(DataError, match="labels CSV not found"):
        load_folder_dataset(folder, "nope.csv")
    frame = pd.read_csv(folder / "labels.csv")
    frame.loc[2, "patient_id"] = ""
    frame.to_csv(folder / "labels.csv", index=False, na_rep="")
    with pytest.raises(DataError, match="row 4 .* no patient_id"):
        load_folder_dataset(folder)


def test_preload_equals_lazy_decoding(folder: Path) -> None:
    lazy, _ = load_folder_dataset(folder, seed=0, limit=6)
    eager, info = load_folder_dataset(folder, seed=0, limit=6, input_spec=SPEC, preload=True)
    assert info["preloaded"] and isinstance(eager["train"].inputs, torch.Tensor)
    assert eager["train"].inputs.shape == (6, 1, 16, 16)
    assert eager["train"].ids == lazy["train"].ids
    for i, path in enumerate(lazy["train"].inputs):
        expected = to_model_grid(read_image(path), channels=1, spatial_dims=2, size=16)
        assert torch.equal(eager["train"].inputs[i], expected)
    with pytest.raises(ConfigError, match="input_spec"):
        load_folder_dataset(folder, preload=True)


# ----------------------------------------------------------------------------- ISIC 2017
@pytest.fixture(scope="module")
def isic_root() -> Path:
    return require_data("dermoscopy/isic2017")


def test_isic2017_catalog_entry_resolves() -> None:
    require_data("dermoscopy/isic2017/labels_derived.csv")
    entry = get_entry("isic2017")
    assert entry.task == ISIC2017_TASK and entry.task.positive_class == "melanoma"
    assert entry.options == {"format": "isic2017", "spatial_dims": 2, "channels": 3}
    assert resolve(entry)[0].name == "labels_derived.csv"


def test_isic2017_splits_and_metadata(isic_root: Path) -> None:
    splits, info = load_isic2017(isic_root, seed=0, calib_fraction=0.15)
    assert {k: len(s) for k, s in splits.items()} == {"train": 1700, "val": 150, "calib": 300,
                                                     "test": 600}
    melanoma = {k: int((s.targets == 0).sum()) for k, s in splits.items()}
    assert melanoma["train"] + melanoma["calib"] == 374 and melanoma["val"] == 30
    assert melanoma["test"] == 117
    for name in ("train", "calib", "val"):
        meta = splits[name].metadata
        assert list(meta.columns) == ["age", "sex"] and meta["age"].dtype == float
    assert splits["test"].metadata is None and "none" in info["metadata"]["test"]
    # ISIC_0000013 has age "unknown" in the training metadata
    train_meta = pd.read_csv(isic_root / "ISIC-2017_Training_Data_metadata.csv", dtype=str)
    unknown = train_meta.loc[train_meta["age_approximate"] == "unknown", "image_id"].iloc[0]
    for split in (splits["train"], splits["calib"]):
        ids = [Path(i).stem for i in split.ids]
        if unknown in ids:
            assert np.isnan(split.metadata["age"].iloc[ids.index(unknown)])
            break
    else:
        pytest.fail(f"{unknown} not found in train or calib")


def test_isic2017_preloaded_few_images(isic_root: Path) -> None:
    spec = {"channels": 3, "spatial_dims": 2, "size": 32, "normalize": "dtype-range"}
    splits, _ = load_isic2017(isic_root, input_spec=spec, limit=3, preload=True)
    for split in splits.values():
        assert split.inputs.shape == (3, 3, 32, 32)
        assert float(split.inputs.min()) >= 0.0 and float(split.inputs.max()) <= 1.0
