"""Stain handling for H&E tiles: Macenko normalisation and HED colour jitter.

:class:`MacenkoNormalizer` wraps torchstain's NumPy Macenko implementation (Macenko et al., ISBI
2009) in scikit-learn manners: ``fit`` estimates the reference stain vectors and maximal
concentrations from a reference image (learned state ``stain_matrix_``, ``max_conc_``), and
``transform`` maps another image's stains onto them. :func:`hed_jitter` is the augmentation
alternative (Tellez et al. 2018): scale and shift each of the haematoxylin, eosin and DAB
channels after colour deconvolution (scikit-image's ``rgb2hed``/``hed2rgb``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from meddx.errors import DataError

__all__ = ["MacenkoNormalizer", "hed_jitter"]


class MacenkoNormalizer:
    """Macenko stain normalisation.

    Args:
        io: transmitted light intensity (the background's brightness).
        alpha: percentile of the angle range kept when estimating the stain vectors.
        beta: optical-density threshold under which a pixel counts as background.
    """

    def __init__(self, io: int = 240, alpha: float = 1.0, beta: float = 0.15) -> None:
        self.io = io
        self.alpha = alpha
        self.beta = beta

    def _impl(self) -> Any:
        from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

        impl = NumpyMacenkoNormalizer()
        if hasattr(self, "stain_matrix_"):
            impl.HERef = np.asarray(self.stain_matrix_, dtype=np.float64)
            impl.maxCRef = np.asarray(self.max_conc_, dtype=np.float64)
        return impl

    def fit(self, rgb: np.ndarray) -> MacenkoNormalizer:
        """Estimate the reference stain vectors from an ``(h, w, 3)`` uint8 H&E image."""
        impl = self._impl()
        try:
            impl.fit(_rgb_array(rgb), Io=self.io, alpha=self.alpha, beta=self.beta)
        except (ValueError, IndexError, np.linalg.LinAlgError) as e:
            raise DataError("too little stained tissue to estimate the stain vectors",
                            hint="fit on a tile or thumbnail that holds tissue") from e
        self.stain_matrix_ = np.asarray(impl.HERef, dtype=np.float64)
        self.max_conc_ = np.asarray(impl.maxCRef, dtype=np.float64)
        return self

    def transform(self, rgb: np.ndarray) -> np.ndarray:
        """``rgb`` with its stains mapped onto the fitted reference (same shape, uint8)."""
        if not hasattr(self, "stain_matrix_"):
            raise DataError("the stain normaliser is not fitted", hint="call fit() first")
        try:
            out, _, _ = self._impl().normalize(_rgb_array(rgb), Io=self.io, alpha=self.alpha,
                                               beta=self.beta, stains=False)
        except (ValueError, IndexError, np.linalg.LinAlgError) as e:
            raise DataError("too little stained tissue in this image to normalise it") from e
        return np.asarray(out, dtype=np.uint8)


def _rgb_array(rgb: np.ndarray) -> np.ndarray:
    a = np.asarray(rgb)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise DataError(f"stain normalisation needs an (h, w, 3) RGB image, got {a.shape}")
    return a.astype(np.uint8, copy=False)


def hed_jitter(batch: np.ndarray, sigma: float = 0.05,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """HED colour augmentation of ``(B, h, w, 3)`` uint8 tiles: each tile's H, E and D
    channels are scaled by ``1 + N(0, sigma)`` and shifted by ``N(0, sigma)`` (in the
    deconvolved optical-density space), then recomposed."""
    from skimage.color import hed2rgb, rgb2hed

    rng = rng or np.random.default_rng()
    x = np.asarray(batch)
    squeeze = x.ndim == 3
    if squeeze:
        x = x[None]
    out = np.empty_like(x, dtype=np.uint8)
    for i, tile in enumerate(x):
        hed = rgb2hed(tile)
        scale = 1 + rng.normal(0, sigma, 3)
        shift = rng.normal(0, sigma, 3) * np.abs(hed).reshape(-1, 3).max(axis=0).clip(1e-3)
        rgb = hed2rgb(hed * scale + shift)
        out[i] = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
    return out[0] if squeeze else out
