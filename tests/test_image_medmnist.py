"""MedMNIST npz reading: sizes, label layouts, task kinds, splits, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from meddx.config import DataConfig
from meddx.errors import DataError, InputMismatchError
from meddx.modalities import get_modality
from meddx.modalities.image.modality import load_medmnist
from meddx.tasks import TaskSpec

BIN = TaskSpec(kind="binary", class_names=["malignant", "normal"], positive_class="malignant")


def _fake_npz(path: Path, shape: tuple[int, ...], labels: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 255, (len(labels), *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = labels
    np.savez(path, **arrays)
    return path


def test_breastmnist_splits_calib_carved_from_train(breast_npz: Path) -> None:
    from meddx.catalog import get_entry

    entry = get_entry("breastmnist")
    bundle = get_modality("image").load(DataConfig(dataset="breastmnist"), entry, entry.task, 0)
    sizes = {k: len(v) for k, v in bundle.splits.items()}
    assert sizes["val"] == 78 and sizes["test"] == 156
    assert sizes["train"] + sizes["calib"] == 546
    assert abs(sizes["calib"] - 0.15 * 546) <= 1
    assert not set(bundle.splits["train"].ids) & set(bundle.splits["calib"].ids)
    # stratified: the malignant share of calib is close to train's
    share = [bundle.splits[s].targets.mean() for s in ("train", "calib")]
    assert abs(share[0] - share[1]) < 0.05
    assert bundle.input_spec == {"spatial_dims": 2, "channels": 1, "size": 28,
                                 "normalize": "dtype-range", "format": "medmnist",
                                 "value_range": [0, 255]}
    # the same seed carves the same calib split
    again = get_modality("image").load(DataConfig(dataset="breastmnist"), entry, entry.task, 0)
    assert again.splits["calib"].ids == bundle.splits["calib"].ids


@pytest.mark.parametrize("labels", [np.array([[0], [1], [1], [0]]), np.array([0, 1, 1, 0])])
def test_labels_shaped_n_or_n1(tmp_path: Path, labels: np.ndarray) -> None:
    splits = load_medmnist(_fake_npz(tmp_path / "x.npz", (28, 28), labels), BIN, 2)
    np.testing.assert_array_equal(splits["train"].targets, [1, 0, 0, 1])


def test_multilabel_ordinal_rgb_and_3d_layouts(tmp_path: Path) -> None:
    ml = TaskSpec(kind="multilabel", class_names=[f"l{i}" for i in range(14)])
    lab = np.random.default_rng(1).integers(0, 2, (5, 14))
    s = load_medmnist(_fake_npz(tmp_path / "chest.npz", (64, 64), lab), ml, 2)
    assert s["train"].targets.shape == (5, 14)
    ordinal = TaskSpec(kind="ordinal", class_names=[str(i) for i in range(5)])
    s = load_medmnist(_fake_npz(tmp_path / "ret.npz", (28, 28, 3), np.arange(5)[:, None]),
                      ordinal, 2)
    x = get_modality("image").item_tensor(s["train"].inputs[0], {"spatial_dims": 2, "channels": 3})
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32 and x.max() <= 1
    s = load_medmnist(_fake_npz(tmp_path / "vol.npz", (28, 28, 28), np.array([0, 1])), BIN, 3)
    x = get_modality("image").item_tensor(s["test"].inputs[1], {"spatial_dims": 3, "channels": 1})
    assert x.shape == (1, 28, 28, 28)


def test_label_outside_task_names_the_sample(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="train_2"):
        load_medmnist(_fake_npz(tmp_path / "x.npz", (28, 28), np.array([0, 1, 7])), BIN, 2)


def test_corrupt_and_truncated_npz(tmp_path: Path, breast_npz: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_medmnist(bad, BIN, 2)
    cut = tmp_path / "cut.npz"
    cut.write_bytes(breast_npz.read_bytes()[: breast_npz.stat().st_size // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_medmnist(cut, BIN, 2)


def test_wrong_dimensionality_in_npz(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="expected 3D images"):
        load_medmnist(_fake_npz(tmp_path / "x.npz", (28, 28), np.array([0, 1])), BIN, 3)


def test_read_arrays_checks_shape_channels_and_range() -> None:
    m = get_modality("image")
    spec = {"spatial_dims": 2, "channels": 1, "size": 28}
    img = np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)
    sample = m.read(img, spec)
    torch.testing.assert_close(sample.tensor, torch.from_numpy(img[None] / 255.0).float())
    with pytest.raises(InputMismatchError, match="shape"):
        m.read(np.zeros((3, 28, 28), np.uint8), spec)  # wrong channel count
    with pytest.raises(InputMismatchError, match="expects 0..1"):
        m.read(np.full((28, 28), 400.0), spec)
    with pytest.raises(InputMismatchError, match="dimensions"):
        m.read(np.zeros((2, 2, 28, 28), np.uint8), spec)
    with pytest.raises(DataError, match="not found"):
        m.read("/nonexistent/scan.png", spec)


def test_batch_augment_keeps_shape_and_range() -> None:
    from meddx.modalities.image.augment import BatchAugment

    torch.manual_seed(0)
    for dims in (2, 3):
        x = torch.rand(4, 1, *([16] * dims))
        y = BatchAugment(dims, rotate_degrees=15, intensity=0.1)(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
        assert not torch.equal(x, y)
