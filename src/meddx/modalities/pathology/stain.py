"""Stain handling for H&E tiles: Macenko normalisation and HED colour augmentation.

:class:`MacenkoNormalizer` wraps ``torchstain``'s NumPy implementation of Macenko et al. (ISBI
2009) in scikit-learn manners: ``fit`` a reference tile, then ``transform`` tiles so their
haematoxylin and eosin look like the reference's. :func:`hed_jitter` is the HED-space colour
augmentation of Tellez et al. (2018) with scikit-image's colour-deconvolution matrices.
"""

from __future__ import annotations

import logging

import numpy as np

from meddx.errors import ConfigError, DataError

__all__ = ["MacenkoNormalizer", "hed_jitter", "REFERENCE_STAIN_MATRIX", "REFERENCE_MAX_CONC"]

logger = logging.getLogger(__name__)

# Macenko's reference H&E optical-density vectors (columns) and 99th-percentile concentrations,
# as in the original MATLAB code and torchstain
REFERENCE_STAIN_MATRIX = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
REFERENCE_MAX_CONC = np.array([1.9705, 1.0308])


def _as_batch(rgb: np.ndarray, name: str) -> tuple[np.ndarray, bool]:
    array = np.asarray(rgb)
    if array.dtype != np.uint8 or array.ndim not in (3, 4) or array.shape[-1] != 3:
        raise DataError(f"{name} expects uint8 RGB of shape (h, w, 3) or (n, h, w, 3), got "
                        f"{array.dtype} {array.shape}")
    return (array[None], True) if array.ndim == 3 else (array, False)


class MacenkoNormalizer:
    """Macenko stain normalisation (torchstain's NumPy backend).

    Args:
        io: transmitted light intensity (the glass's brightness).
        alpha: percentile of the angle range kept when estimating the stain vectors.
        beta: optical density below which a pixel is glass and ignored.
        min_tissue_pixels: a tile with fewer stained pixels than this is returned unchanged
            (its stain vectors cannot be estimated; glass has nothing to normalise).

    Attributes (after :meth:`fit`):
        stain_matrix_: ``(3, 2)`` optical-density vectors of haematoxylin and eosin.
        max_conc_: ``(2,)`` 99th-percentile concentrations of the two stains.
    """

    def __init__(self, io: float = 240.0, alpha: float = 1.0, beta: float = 0.15,
                 min_tissue_pixels: int = 500) -> None:
        self.io = io
        self.alpha = alpha
        self.beta = beta
        self.min_tissue_pixels = min_tissue_pixels

    @classmethod
    def reference(cls, **kwargs: float) -> MacenkoNormalizer:
        """A normalizer fitted to Macenko's published reference stain (no fitting image)."""
        out = cls(**kwargs)
        out.stain_matrix_ = REFERENCE_STAIN_MATRIX.copy()
        out.max_conc_ = REFERENCE_MAX_CONC.copy()
        return out

    def _backend(self):  # noqa: ANN202 - torchstain's class
        from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

        return NumpyMacenkoNormalizer()

    def _stained(self, image: np.ndarray) -> int:
        od = -np.log((image.reshape(-1, 3).astype(np.float32) + 1) / self.io)
        return int(np.count_nonzero(~np.any(od < self.beta, axis=1)))

    def fit(self, rgb: np.ndarray) -> MacenkoNormalizer:
        """Estimate the reference stain from a tile (or a mosaic of tiles) of tissue.

        Raises:
            DataError: the image is not uint8 RGB or holds too little stained tissue.
        """
        batch, _ = _as_batch(rgb, "MacenkoNormalizer.fit")
        image = batch.reshape(-1, 1, 3)
        if self._stained(image) < self.min_tissue_pixels:
            raise DataError("the reference image holds too little stained tissue to estimate "
                            f"its stains (< {self.min_tissue_pixels} pixels)")
        backend = self._backend()
        try:
            backend.fit(image, Io=self.io, alpha=self.alpha, beta=self.beta)
        except (np.linalg.LinAlgError, ValueError) as e:
            raise DataError(f"cannot estimate the reference stains: {e}") from e
        self.stain_matrix_ = np.asarray(backend.HERef, dtype=np.float64)
        self.max_conc_ = np.asarray(backend.maxCRef, dtype=np.float64)
        return self

    def transform(self, rgb: np.ndarray) -> np.ndarray:
        """Tiles re-coloured to the reference stain, same shape, uint8.

        A tile with too little stained tissue (glass) is returned unchanged.
        """
        if not hasattr(self, "stain_matrix_"):
            raise ConfigError("MacenkoNormalizer is not fitted: call fit(reference_tile) or use "
                              "MacenkoNormalizer.reference()")
        batch, single = _as_batch(rgb, "MacenkoNormalizer.transform")
        backend = self._backend()
        backend.HERef, backend.maxCRef = self.stain_matrix_, self.max_conc_
        out = batch.copy()
        for i, image in enumerate(batch):
            if self._stained(image) < self.min_tissue_pixels:
                continue
            try:
                out[i] = backend.normalize(image, Io=self.io, alpha=self.alpha, beta=self.beta,
                                           stains=False)[0]
            except (np.linalg.LinAlgError, ValueError) as e:
                logger.debug("tile %d left as is: its stains could not be estimated (%s)", i, e)
        return out[0] if single else out

    def fit_transform(self, rgb: np.ndarray) -> np.ndarray:
        """``fit(rgb).transform(rgb)``."""
        return self.fit(rgb).transform(rgb)


def hed_jitter(batch: np.ndarray, sigma: float = 0.05,
               rng: np.random.Generator | int | None = None) -> np.ndarray:
    """HED colour augmentation (Tellez et al., 2018).

    Each image's haematoxylin, eosin and DAB channels (Ruifrok-Johnston colour deconvolution,
    scikit-image's ``hed_from_rgb`` / ``rgb_from_hed`` matrices and scale, as in its ``rgb2hed``)
    are scaled by ``1 + a`` and shifted by ``b``, with ``a, b ~ U(-sigma, sigma)`` drawn per
    image and channel, then converted back to RGB. Unlike ``rgb2hed`` the negative stain values
    of near-white pixels are not clipped, so ``sigma=0`` gives the image back.

    Args:
        batch: uint8 RGB, ``(h, w, 3)`` or ``(n, h, w, 3)``.
        sigma: strength of the jitter (0.05 is Tellez's "light", 0.2 "strong").
        rng: a NumPy generator or seed.

    Returns:
        uint8 RGB of the same shape.
    """
    from skimage.color import hed_from_rgb, rgb_from_hed

    if sigma < 0:
        raise ConfigError(f"sigma must be non-negative, got {sigma}")
    images, single = _as_batch(batch, "hed_jitter")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    log_adjust = np.log(1e-6)  # scikit-image's scale of the stain channels
    out = np.empty_like(images)
    for i, image in enumerate(images):
        rgb = np.maximum(image.astype(np.float64) / 255.0, 1e-6)
        hed = (np.log(rgb) / log_adjust) @ hed_from_rgb
        a = rng.uniform(-sigma, sigma, 3)
        b = rng.uniform(-sigma, sigma, 3)
        back = np.exp(((hed * (1 + a) + b) * log_adjust) @ rgb_from_hed)
        out[i] = np.clip(np.rint(back * 255.0), 0, 255).astype(np.uint8)
    return out[0] if single else out
