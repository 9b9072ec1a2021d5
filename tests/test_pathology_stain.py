"""Stain handling: Macenko normalisation recovers known stains; HED jitter changes colour only."""

from __future__ import annotations

import numpy as np
import pytest

from meddx.errors import ConfigError, DataError
from meddx.modalities.pathology.stain import (
    REFERENCE_STAIN_MATRIX,
    MacenkoNormalizer,
    hed_jitter,
)


def stained(stains: np.ndarray, seed: int = 0, shape=(64, 64)) -> np.ndarray:
    """An H&E-like image from two stains' optical-density vectors and random concentrations
    (Beer-Lambert, light intensity 240), plus some glass."""
    rng = np.random.default_rng(seed)
    conc = rng.gamma(2.0, 0.35, (2, shape[0] * shape[1]))
    conc[:, : shape[0] * shape[1] // 8] = 0  # glass
    rgb = 240 * np.exp(-(stains / np.linalg.norm(stains, axis=0)) @ conc)
    return np.clip(rgb.T.reshape(*shape, 3), 0, 255).astype(np.uint8)


OTHER = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])  # Ruifrok-Johnston H and E


def test_fit_recovers_the_stain_vectors() -> None:
    norm = MacenkoNormalizer().fit(stained(OTHER))
    assert norm.stain_matrix_.shape == (3, 2) and norm.max_conc_.shape == (2,)
    unit = OTHER / np.linalg.norm(OTHER, axis=0)
    cosines = (norm.stain_matrix_ * unit).sum(axis=0)
    assert (cosines > 0.98).all(), cosines


def test_transform_makes_another_staining_look_like_the_reference() -> None:
    norm = MacenkoNormalizer().fit(stained(REFERENCE_STAIN_MATRIX, seed=1))
    target = stained(REFERENCE_STAIN_MATRIX, seed=2)
    restained = stained(OTHER, seed=2)  # same tissue (concentrations), other stains
    before = np.abs(restained.astype(int) - target).mean()
    after = np.abs(norm.transform(restained).astype(int) - target).mean()
    assert after < before / 3, (before, after)
    batch = norm.transform(np.stack([restained, target]))
    assert batch.shape == (2, 64, 64, 3) and batch.dtype == np.uint8


def test_glass_is_left_alone_and_misuse_is_explained() -> None:
    glass = np.full((32, 32, 3), 238, np.uint8)
    np.testing.assert_array_equal(MacenkoNormalizer.reference().transform(glass), glass)
    with pytest.raises(ConfigError, match="not fitted"):
        MacenkoNormalizer().transform(glass)
    with pytest.raises(DataError, match="too little stained tissue"):
        MacenkoNormalizer().fit(glass)
    with pytest.raises(DataError, match="uint8 RGB"):
        MacenkoNormalizer.reference().transform(glass.astype(np.float32))


def test_hed_jitter_changes_colour_not_structure() -> None:
    image = stained(REFERENCE_STAIN_MATRIX)
    same = hed_jitter(image, sigma=0.0, rng=0)
    assert np.abs(same.astype(int) - image).max() <= 1  # the deconvolution round trip
    a, b = hed_jitter(image, sigma=0.1, rng=3), hed_jitter(image, sigma=0.1, rng=3)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - image).mean() > 2
    # colour moves, structure stays: the jittered image still correlates with the original
    grey = lambda x: x.astype(float).mean(axis=-1).ravel()  # noqa: E731
    assert np.corrcoef(grey(a), grey(image))[0, 1] > 0.9
    batch = hed_jitter(np.stack([image, image]), sigma=0.1, rng=0)
    assert batch.shape == (2, 64, 64, 3) and not np.array_equal(batch[0], batch[1])
