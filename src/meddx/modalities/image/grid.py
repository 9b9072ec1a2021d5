"""Map a decoded image onto a network's input grid: channels, intensity, size.

The same function runs at training time (folder datasets) and at prediction time (files sent
to the CLI or the service), so a user's file is preprocessed exactly as the training images
were. Intensity scaling uses the source's integer range where it is known (``dtype-range``):
an 8-bit PNG of a MedMNIST image becomes ``x / 255``, exactly the tensor MedMNIST's ``.npz``
gives. Resizing is MONAI's ``Resize`` (area when shrinking, (tri)linear when enlarging) or
``ResizeWithPadOrCrop``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from meddx.errors import ConfigError, DataError, InputMismatchError

if TYPE_CHECKING:
    from meddx.modalities.image.data import ImageData

__all__ = ["to_model_grid", "check_input", "NORMALIZATIONS", "WINDOW_PRESETS", "RESIZE_MODES"]

logger = logging.getLogger(__name__)

NORMALIZATIONS = ("dtype-range", "minmax", "image-minmax", "zscore", "window", "none")
RESIZE_MODES = ("resize", "pad-crop")
# (center, width) in Hounsfield units: common CT display windows.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "soft-tissue": (40.0, 400.0),
    "abdomen": (40.0, 400.0),
    "liver": (60.0, 160.0),
    "mediastinum": (50.0, 350.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
}
_LUMA = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601-2, as Pillow's "L"


def to_model_grid(
    image: ImageData,
    *,
    channels: int,
    spatial_dims: int,
    size: int | Sequence[int],
    normalize: str = "dtype-range",
    window: str | Sequence[float] | None = None,
    resize: str = "resize",
    name: str | None = None,
) -> torch.Tensor:
    """Channels, intensity and size of ``image`` as the network expects them.

    Args:
        image: from :func:`~meddx.modalities.image.io.read_image`.
        channels: the network's input channels; gray → RGB repeats, RGB → gray takes the
            luminance (or the one channel when R = G = B); anything else is a mismatch.
        spatial_dims: 2 or 3. A 3D volume for a 2D model is a mismatch (unless it has one
            slice), and so is a 2D image for a 3D model.
        size: edge length (int) or full spatial shape of the grid.
        normalize: ``dtype-range`` (alias ``minmax``): the source's integer range → 0..1
            (8-bit: ``/255``; 16-bit, DICOM BitsStored after rescale), falling back to the
            image's own min–max when the range is unknown (float data); ``image-minmax``;
            ``zscore`` (per channel); ``window`` (CT: clip to ``window`` then 0..1); ``none``.
        window: ``(center, width)``, a preset name (:data:`WINDOW_PRESETS`), or ``"dicom"``
            for the file's own WindowCenter/WindowWidth. Only for ``normalize="window"``.
        resize: ``resize`` (interpolate to the grid) or ``pad-crop`` (centre pad / crop).
        name: shown in errors.

    Returns:
        float32 tensor ``(channels, *grid)``.

    Raises:
        InputMismatchError: dimensionality or channels do not fit the model.
        ConfigError: unknown normalization, window or resize mode.
    """
    label = name or image.meta.get("name")
    arr = _match_dims(image.array, image.spatial_dims, spatial_dims, label)
    arr = _match_channels(arr, channels, label)
    arr = _normalize(arr, normalize, image.meta, window, label)
    grid = _grid_shape(size, spatial_dims)
    out = _resize(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)), grid, resize)
    return out.contiguous()


def check_input(image: ImageData, input_spec: dict[str, Any], *, name: str | None = None,
                min_edge: int = 8) -> None:
    """Refuse inputs that differ from what the model was trained on (service input checks).

    Checks, each an :class:`InputMismatchError` with the reason: DICOM Modality against
    ``input_spec["dicom_modality"]``; dimensionality and channels (as :func:`to_model_grid`);
    an image smaller than ``min_edge`` pixels on a side; a blank (constant) image; and the
    source's integer range against ``input_spec["value_range"]`` when both are known (e.g. a
    16-bit CT slice sent to a model trained on 8-bit ultrasound PNGs).
    """
    label = name or image.meta.get("name")
    expected, got = input_spec.get("dicom_modality"), image.meta.get("modality")
    if expected and got and str(got).upper() != str(expected).upper():
        raise InputMismatchError(f"DICOM Modality is {got}; the model was trained on {expected}",
                                 path=label, hint=f"send a {expected} image")
    arr = _match_dims(image.array, image.spatial_dims, int(input_spec["spatial_dims"]), label)
    _match_channels(arr, int(input_spec["channels"]), label)
    if min(image.spatial_shape) < min_edge:
        raise InputMismatchError(
            f"image is only {'×'.join(map(str, image.spatial_shape))} pixels", path=label,
            hint=f"send an image at least {min_edge} pixels on each side")
    if float(image.array.max()) == float(image.array.min()):
        raise InputMismatchError("image is blank (every pixel has the same value)", path=label)
    trained, have = input_spec.get("value_range"), image.meta.get("value_range")
    if trained is not None and have is not None and [float(v) for v in trained] != [
            float(v) for v in have]:
        raise InputMismatchError(
            f"image values span {have[0]:g}..{have[1]:g}; the model was trained on images "
            f"spanning {trained[0]:g}..{trained[1]:g}",
            path=label, hint="send the same kind of image (bit depth, rescale) as in training")


def _match_dims(arr: np.ndarray, have: int, want: int, label: str | None) -> np.ndarray:
    if have == want:
        return arr
    if have == 3 and want == 2:
        if arr.shape[1] == 1:
            return arr[:, 0]
        raise InputMismatchError(
            f"a 3D volume of {arr.shape[1]} slices was sent to a 2D model",
            path=label,
            hint="send a single 2D image (one slice or frame) or use a 3D model",
        )
    if have == 2 and want == 3:
        raise InputMismatchError(
            "a 2D image was sent to a 3D model",
            path=label,
            hint="send the whole volume (multi-frame DICOM, NIfTI, or a (D, H, W) .npy)",
        )
    raise InputMismatchError(f"a {have}D input does not fit a {want}D model", path=label)


def _match_channels(arr: np.ndarray, want: int, label: str | None) -> np.ndarray:
    have = arr.shape[0]
    if have == want:
        return arr
    if have == 1 and want == 3:
        return np.repeat(arr, 3, axis=0)
    if have == 3 and want == 1:
        if np.array_equal(arr[0], arr[1]) and np.array_equal(arr[0], arr[2]):
            return arr[:1]  # a gray image stored as RGB: exact, no rounding
        return np.tensordot(_LUMA, arr, axes=(0, 0))[None]
    raise InputMismatchError(
        f"image has {have} channel(s); the model takes {want}",
        path=label,
        hint="send grayscale (1 channel) or RGB (3 channels) images as the model was trained on",
    )


def _resolve_window(window: str | Sequence[float] | None, meta: dict[str, Any],
                    label: str | None) -> tuple[float, float]:
    if window is None:
        raise ConfigError("normalize='window' needs a window: (center, width) or a preset",
                          hint=f"presets: {', '.join(WINDOW_PRESETS)}, or 'dicom'")
    if isinstance(window, str):
        if window == "dicom":
            if not meta.get("window"):
                raise DataError("the DICOM file has no WindowCenter/WindowWidth", path=label,
                                hint="set an explicit window (center, width) in the input spec")
            center, width = meta["window"]
            return float(center), float(width)
        if window not in WINDOW_PRESETS:
            raise ConfigError(f"unknown window preset '{window}'",
                              hint=f"presets: {', '.join(WINDOW_PRESETS)}, or 'dicom'")
        return WINDOW_PRESETS[window]
    center, width = (float(v) for v in window)
    if width <= 0:
        raise ConfigError(f"window width must be positive, got {width}")
    return center, width


def _normalize(arr: np.ndarray, how: str, meta: dict[str, Any],
               window: str | Sequence[float] | None, label: str | None) -> np.ndarray:
    from monai.transforms import NormalizeIntensity, ScaleIntensity, ScaleIntensityRange

    arr = np.asarray(arr, dtype=np.float32)
    if how in ("dtype-range", "minmax"):
        value_range = meta.get("value_range")
        if value_range is not None:
            lo, hi = (float(v) for v in value_range)
            if hi > lo:
                # (x - lo) / (hi - lo): for uint8 exactly x / 255 in float32, as MedMNIST's /255
                return (arr - np.float32(lo)) / np.float32(hi - lo)
        how = "image-minmax"
    if how == "image-minmax":
        return _plain(ScaleIntensity(minv=0.0, maxv=1.0, channel_wise=False)(arr))
    if how == "zscore":
        return _plain(NormalizeIntensity(channel_wise=True)(arr))
    if how == "window":
        center, width = _resolve_window(window, meta, label)
        scaler = ScaleIntensityRange(a_min=center - width / 2, a_max=center + width / 2,
                                     b_min=0.0, b_max=1.0, clip=True)
        return _plain(scaler(arr))
    if how == "none":
        return arr
    raise ConfigError(f"unknown normalization '{how}'", hint=f"use one of {NORMALIZATIONS}")


def _plain(x: Any) -> np.ndarray:
    """MONAI may hand back a MetaTensor; the grid works on plain float32 arrays."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy() if not hasattr(x, "as_tensor") else x.as_tensor().numpy()
    return np.asarray(x, dtype=np.float32)


def _grid_shape(size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    if isinstance(size, int | np.integer):
        return (int(size),) * spatial_dims
    grid = tuple(int(s) for s in size)
    if len(grid) != spatial_dims:
        raise ConfigError(f"size {grid} does not have {spatial_dims} spatial dimensions")
    return grid


def _resize(x: torch.Tensor, grid: tuple[int, ...], how: str) -> torch.Tensor:
    from monai.transforms import Resize, ResizeWithPadOrCrop

    if tuple(x.shape[1:]) == grid:
        return x
    if how == "resize":
        shrink = all(s <= t for s, t in zip(grid, x.shape[1:], strict=True))
        mode = "area" if shrink else ("bilinear" if len(grid) == 2 else "trilinear")
        out = Resize(spatial_size=grid, mode=mode)(x)
    elif how == "pad-crop":
        out = ResizeWithPadOrCrop(spatial_size=grid)(x)
    else:
        raise ConfigError(f"unknown resize mode '{how}'", hint=f"use one of {RESIZE_MODES}")
    out = out.as_tensor() if hasattr(out, "as_tensor") else out
    return torch.as_tensor(out, dtype=torch.float32)


def check_plausible(tensor: Any, spec: dict[str, Any], pixels: int | None) -> None:
    """Refuse model inputs that cannot be what the model was trained on.

    * values that are not finite, or an image that is one flat value (blank);
    * an image far smaller than the model's grid (under a quarter of its side: upsampling it
      would invent the detail the model looks at);
    * a mean intensity outside ``spec["intensity_range"]`` (``[low, high]`` of the training
      inputs after preprocessing), when the card records it.

    Raises:
        DataError: non-finite values. InputMismatchError: blank, too small, out of range.
    """
    x = np.asarray(tensor.numpy() if hasattr(tensor, "numpy") else tensor, dtype=np.float32)
    if not np.isfinite(x).all():
        raise DataError("the input holds NaN or infinite values after preprocessing")
    if x.size and float(x.max() - x.min()) < 1e-6:
        raise InputMismatchError("the image is a single flat value (blank)",
                                 hint="check that the right file was sent")
    size, dims = spec.get("size"), int(spec.get("spatial_dims", 2))
    if pixels is not None and size and pixels < (int(size) // 4) ** dims:
        raise InputMismatchError(
            f"the image has {pixels} pixels; the model works on {size}^{dims} and would have "
            "to invent detail", hint="send the original, full-resolution image")
    rng = spec.get("intensity_range")
    if rng is not None and not float(rng[0]) <= float(x.mean()) <= float(rng[1]):
        raise InputMismatchError(
            f"the image's mean intensity {float(x.mean()):.3g} is outside the range seen in "
            f"training [{float(rng[0]):.3g}, {float(rng[1]):.3g}]",
            hint="check the modality, windowing and bit depth of the image")
