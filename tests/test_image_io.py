"""Image file readers: PNG/JPEG/BMP/TIFF, DICOM (pydicom's real test files), NIfTI, .npy, and the
mapping onto a model grid. Every bad input named in the issues gets a specific MeddxError."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.uid import UID

from conftest import IN_CI, require_data
from meddx.errors import ConfigError, DataError, InputMismatchError, PayloadTooLargeError
from meddx.modalities.image.io import (
    ImageData,
    detect_format,
    image_from_array,
    read_image,
    to_model_grid,
)


def dicom_file(name: str) -> str:
    """A DICOM file shipped inside pydicom's wheel (never downloaded)."""
    path = pydicom.data.get_testdata_file(name, download=False)
    if path is None:
        msg = f"pydicom test file {name} is not installed"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def png_bytes(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(array)
    (img.convert(mode) if mode else img).save(buf, format=fmt)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


RNG = np.random.default_rng(0)
GRAY = RNG.integers(0, 256, (28, 28), dtype=np.uint8)
RGB = RNG.integers(0, 256, (28, 30, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- PNG and co.
def test_png_round_trip_equals_array() -> None:
    gray = read_image(png_bytes(GRAY), name="g.png")
    assert gray.spatial_dims == 2 and gray.array.dtype == np.float32
    np.testing.assert_array_equal(gray.array[0], GRAY)
    rgb = read_image(png_bytes(RGB), name="c.png")
    np.testing.assert_array_equal(np.moveaxis(rgb.array, 0, -1), RGB)
    assert rgb.meta["format"] == "png" and rgb.meta["value_range"] == [0.0, 255.0]


def test_png_16_bit_keeps_full_range() -> None:
    deep = RNG.integers(0, 65536, (12, 9), dtype=np.uint16)
    image = read_image(png_bytes(deep), name="deep.png")
    assert image.meta["photometric"].startswith("I;16")
    np.testing.assert_array_equal(image.array[0], deep)
    grid = to_model_grid(image, channels=1, spatial_dims=2, size=(12, 9))
    assert torch.equal(grid[0], torch.from_numpy(deep.astype(np.float32) / 65535.0))


@pytest.mark.parametrize(("mode", "channels", "note"), [
    ("RGBA", 3, "alpha channel dropped"),
    ("LA", 1, "alpha channel dropped"),
    ("P", 3, "palette expanded to RGB"),
    ("1", 1, None),
    ("L", 1, None),
])
def test_pillow_modes_are_handled_explicitly(mode: str, channels: int, note: str | None) -> None:
    image = read_image(png_bytes(RGB, mode=mode), name=f"{mode}.png")
    assert image.channels == channels and image.meta["photometric"] == mode
    assert (note in image.meta["notes"]) if note else not image.meta["notes"]


@pytest.mark.parametrize("fmt", ["JPEG", "BMP", "TIFF"])
def test_other_pillow_formats_detected_by_content(fmt: str) -> None:
    image = read_image(png_bytes(RGB, fmt=fmt), name="upload.bin")
    assert image.meta["format"] == fmt.lower() and image.array.shape == (3, 28, 30)


def test_medmnist_png_gives_exactly_the_npz_tensor() -> None:
    with np.load(require_data("medmnist/breastmnist.npz")) as data:
        x = data["test_images"][0]
    tensor = to_model_grid(read_image(png_bytes(x), name="b.png"), channels=1, spatial_dims=2,
                           size=28, normalize="dtype-range")
    assert torch.equal(tensor[0], torch.from_numpy(x.astype(np.float32) / 255.0))


def test_truncated_png_names_the_file() -> None:
    data = png_bytes(RNG.integers(0, 256, (64, 64), dtype=np.uint8))
    with pytest.raises(DataError, match="corrupt or truncated") as err:
        read_image(data[: len(data) // 2], name="half.png")
    assert err.value.context["path"] == "half.png"


def test_corrupt_png_and_jpeg(tmp_path: Path) -> None:
    data = bytearray(png_bytes(GRAY))
    data[40:80] = b"\x00" * 40  # inside IDAT
    bad = tmp_path / "bad.png"
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError) as err:
        read_image(bad)
    assert "bad.png" in str(err.value)
    jpeg = png_bytes(RGB, fmt="JPEG")
    with pytest.raises(DataError, match="JPEG"):
        read_image(jpeg[:200], name="cut.jpg")


def test_unreadable_and_odd_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "absent.png")
    with pytest.raises(DataError, match="folder"):
        read_image(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError):
        read_image(tmp_path / "empty.png")
    (tmp_path / "notes.txt").write_bytes(b"just some text, not an image")
    with pytest.raises(DataError, match="unknown image format") as err:
        read_image(tmp_path / "notes.txt")
    assert "DICOM" in err.value.hint and "NIfTI" in err.value.hint
    if os.name == "posix" and os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.png"
        locked.write_bytes(png_bytes(GRAY))
        locked.chmod(0)
        with pytest.raises(DataError, match="cannot be read"):
            read_image(locked)


def test_png_declaring_50000_squared_pixels_rejected_before_decoding() -> None:
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 50_000, 50_000, 8, 0, 0, 0, 0))
    header_only = b"\x89PNG\r\n\x1a\n" + ihdr
    with pytest.raises(PayloadTooLargeError, match="2,500,000,000"):
        read_image(header_only, name="bomb.png")
    # with IEND Pillow can parse it too; its own bomb error is mapped to ours
    with pytest.raises(PayloadTooLargeError):
        read_image(header_only + png_chunk(b"IEND", b""), name="bomb.png",
                   max_pixels=10**12)


def test_jpeg_declaring_huge_size_rejected_from_header() -> None:
    jpeg = bytearray(png_bytes(GRAY, fmt="JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5: sof + 9] = struct.pack(">HH", 60_000, 60_000)  # height, width
    with pytest.raises(PayloadTooLargeError, match="JPEG header"):
        read_image(bytes(jpeg), name="big.jpg")


# --------------------------------------------------------------------------------- DICOM
LOSSLESS_MR = ["MR_small_bigendian.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm",
               "MR_small_jp2klossless.dcm", "MR_small_implicit.dcm"]


@pytest.mark.parametrize("name", LOSSLESS_MR)
def test_dicom_encodings_decode_to_the_same_pixels(name: str) -> None:
    reference = read_image(dicom_file("MR_small.dcm"))
    image = read_image(dicom_file(name))
    assert image.meta["modality"] == "MR"
    np.testing.assert_array_equal(image.array, reference.array)


def test_dicom_ct_rescaled_to_hounsfield() -> None:
    path = dicom_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    image = read_image(path)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(image.array[0], expected.astype(np.float32))
    assert image.meta["modality"] == "CT" and image.meta["rescaled"] is True
    assert image.meta["spacing"] == pytest.approx([0.661468, 0.661468])


@pytest.mark.parametrize(("name", "shape", "syntax"), [
    ("JPEG2000.dcm", (1, 1024, 256), "JPEG 2000"),
    ("693_J2KI.dcm", (1, 512, 512), "JPEG 2000"),
    ("JPGExtended.dcm", (1, 1024, 256), "JPEG Extended"),
    ("SC_rgb_jpeg_gdcm.dcm", (3, 100, 100), "JPEG Lossless"),
    ("JPEGLSNearLossless_08.dcm", (1, 45, 10), "JPEG-LS"),
])
def test_dicom_compressed(name: str, shape: tuple[int, ...], syntax: str) -> None:
    image = read_image(dicom_file(name))
    assert image.array.shape == shape and syntax in image.meta["transfer_syntax"]
    assert np.isfinite(image.array).all() and image.array.std() > 0


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "SC_ybr_full_422_uncompressed.dcm"])
def test_dicom_ybr_converted_to_rgb(name: str) -> None:
    reference = read_image(dicom_file("SC_rgb_jpeg_gdcm.dcm"))  # lossless RGB
    image = read_image(dicom_file(name))
    assert image.meta["photometric"].startswith("YBR")
    assert any("converted to RGB" in n for n in image.meta["notes"])
    # same test pattern (red, green, blue, … bands): RGB within JPEG/YBR rounding
    assert np.abs(image.array - reference.array).mean() < 3


def test_dicom_multiframe_gray_is_a_volume() -> None:
    image = read_image(dicom_file("rtdose.dcm"))
    assert image.spatial_dims == 3 and image.array.shape == (1, 15, 10, 10)
    assert image.meta["n_frames"] == 15
    with pytest.raises(InputMismatchError, match="3D volume of 15 slices"):
        to_model_grid(image, channels=1, spatial_dims=2, size=28)
    assert to_model_grid(image, channels=1, spatial_dims=3, size=8).shape == (1, 8, 8, 8)


def test_dicom_multiframe_rgb_uses_first_frame_with_a_note() -> None:
    image = read_image(dicom_file("SC_rgb_rle_2frame.dcm"))
    assert image.spatial_dims == 2 and image.array.shape == (3, 100, 100)
    assert any("only the first frame" in n for n in image.meta["notes"])


def test_dicom_palette_color_expanded() -> None:
    image = read_image(dicom_file("examples_palette.dcm"))
    assert image.channels == 3 and image.meta["photometric"] == "PALETTE COLOR"


def test_dicom_monochrome1_inverted(tmp_path: Path) -> None:
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    mono1 = read_image(tmp_path / "m1.dcm")
    mono2 = read_image(dicom_file("MR_small.dcm"))
    lo, hi = mono2.meta["value_range"]
    np.testing.assert_array_equal(mono1.array, (lo + hi) - mono2.array)
    assert any("MONOCHROME1" in n for n in mono1.meta["notes"])


def test_dicom_meta_has_no_patient_identifiers() -> None:
    path = dicom_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    meta = read_image(path).meta
    text = repr(meta)
    for keyword in ("PatientName", "PatientID", "StudyDate", "SOPInstanceUID"):
        value = str(ds.get(keyword, ""))
        assert value and value not in text
    assert not any(k.lower().startswith(("patient", "study", "sop")) for k in meta)


@pytest.mark.parametrize("name", ["dicom/CT_small.dcm", "dicom/MR_small.dcm"])
def test_bundled_dicom_through_data_roots(name: str) -> None:
    image = read_image(require_data(name))
    assert image.meta["modality"] == Path(name).stem.split("_")[0]
    grid = to_model_grid(image, channels=1, spatial_dims=2, size=64, normalize="zscore")
    assert grid.shape == (1, 64, 64) and abs(float(grid.mean())) < 0.05


def test_truncated_dicom(tmp_path: Path) -> None:
    data = Path(dicom_file("CT_small.dcm")).read_bytes()
    (tmp_path / "cut_pixels.dcm").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "cut_header.dcm").write_bytes(data[:400])
    for name in ("cut_pixels.dcm", "cut_header.dcm"):
        with pytest.raises(DataError, match="truncated") as err:
            read_image(tmp_path / name)
        assert name in err.value.context["path"]
    with pytest.raises(DataError, match="truncated"):
        read_image(dicom_file("MR_truncated.dcm"))


def test_dicom_without_pixels_and_unsupported_syntax(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no pixel data"):
        read_image(dicom_file("rtplan.dcm"))
    ds = pydicom.dcmread(dicom_file("JPEG2000.dcm"))
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG-2 video
    ds.save_as(tmp_path / "video.dcm", enforce_file_format=True)
    with pytest.raises(DataError, match="MPEG2") as err:
        read_image(tmp_path / "video.dcm")
    assert "gdcmconv" in err.value.hint


def test_dicom_dimension_cap_checked_before_decoding() -> None:
    with pytest.raises(PayloadTooLargeError, match="128×128×1"):
        read_image(dicom_file("CT_small.dcm"), max_pixels=10_000)


def test_format_detected_from_content_when_the_name_lies(tmp_path: Path) -> None:
    disguised = tmp_path / "scan.png"
    shutil.copy(dicom_file("MR_small.dcm"), disguised)
    assert read_image(disguised).meta["format"] == "dicom"
    assert read_image(png_bytes(GRAY), name="scan.dcm").meta["format"] == "png"
    assert detect_format(b"\x00" * 8, "x.dcm") == "dicom"  # preamble-less: by name


# --------------------------------------------------------------------------------- NIfTI
def test_nifti_reoriented_to_ras_and_uploads_match(tmp_path: Path) -> None:
    volume = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    nib.save(nib.Nifti1Image(volume, np.diag([-2.0, 1.5, 3.0, 1.0])), tmp_path / "v.nii.gz")
    image = read_image(tmp_path / "v.nii.gz")
    assert image.spatial_dims == 3 and image.meta["orientation"] == "RAS"
    np.testing.assert_array_equal(image.array[0], volume[::-1])  # x axis was L→R flipped
    assert image.meta["spacing"] == [2.0, 1.5, 3.0]
    upload = read_image((tmp_path / "v.nii.gz").read_bytes(), name="upload")
    np.testing.assert_array_equal(upload.array, image.array)


def test_nifti_4d_channels_2d_and_errors(tmp_path: Path) -> None:
    four = RNG.random((3, 4, 5, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(four, np.eye(4)), tmp_path / "t.nii")
    image = read_image(tmp_path / "t.nii")
    assert image.array.shape == (2, 3, 4, 5)
    np.testing.assert_allclose(image.array[1], four[..., 1])
    flat = RNG.integers(0, 255, (7, 9, 1)).astype(np.uint8)
    nib.save(nib.Nifti1Image(flat, np.eye(4)), tmp_path / "flat.nii")
    assert read_image(tmp_path / "flat.nii").spatial_dims == 2
    raw = (tmp_path / "t.nii").read_bytes()
    with pytest.raises(DataError, match="NIfTI"):
        read_image(raw[: len(raw) - 40], name="cut.nii")
    with pytest.raises(PayloadTooLargeError):
        read_image(tmp_path / "t.nii", max_pixels=100)


# ---------------------------------------------------------------------------------- .npy
def test_npy_layouts_and_pickles_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "rgb.npy", RGB)
    image = read_image(tmp_path / "rgb.npy")
    assert image.array.shape == (3, 28, 30) and image.meta["value_range"] == [0.0, 255.0]
    np.save(tmp_path / "vol.npy", np.zeros((10, 12, 14), np.float32))
    assert read_image(tmp_path / "vol.npy").spatial_dims == 3
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="pickle"):
        read_image(tmp_path / "obj.npy")
    with pytest.raises(PayloadTooLargeError):
        read_image(tmp_path / "vol.npy", max_pixels=100)
    with pytest.raises(DataError, match="NaN"):
        image_from_array(np.full((4, 4), np.nan))


# ------------------------------------------------------------------------- model grid
def test_channel_conversion_rules() -> None:
    gray = image_from_array(GRAY)
    rgb = to_model_grid(gray, channels=3, spatial_dims=2, size=28)
    assert rgb.shape == (3, 28, 28) and torch.equal(rgb[0], rgb[2])
    same = image_from_array(np.repeat(GRAY[..., None], 3, axis=-1))
    assert torch.equal(to_model_grid(same, channels=1, spatial_dims=2, size=28)[0],
                       torch.from_numpy(GRAY / np.float32(255)))
    luma = to_model_grid(image_from_array(RGB), channels=1, spatial_dims=2, size=(28, 30))
    expected = (RGB.astype(np.float32) / 255) @ np.array([0.299, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(luma[0].numpy(), expected, atol=1e-6)


def test_wrong_channel_count_and_dimensionality() -> None:
    four = ImageData(np.zeros((4, 8, 8), np.float32), 2, {"value_range": None})
    with pytest.raises(InputMismatchError, match="4 channel"):
        to_model_grid(four, channels=3, spatial_dims=2, size=8)
    volume = ImageData(np.zeros((1, 5, 8, 8), np.float32), 3, {})
    with pytest.raises(InputMismatchError, match="2D model"):
        to_model_grid(volume, channels=1, spatial_dims=2, size=8)
    with pytest.raises(InputMismatchError, match="3D model"):
        to_model_grid(image_from_array(GRAY), channels=1, spatial_dims=3, size=8)


def test_resize_window_and_options() -> None:
    ct = read_image(dicom_file("CT_small.dcm"))
    lung = to_model_grid(ct, channels=1, spatial_dims=2, size=64, normalize="window",
                         window="lung")
    assert lung.shape == (1, 64, 64) and float(lung.min()) >= 0 and float(lung.max()) <= 1
    explicit = to_model_grid(ct, channels=1, spatial_dims=2, size=64, normalize="window",
                             window=(-600, 1500))
    assert torch.equal(lung, explicit)
    padded = to_model_grid(image_from_array(GRAY), channels=1, spatial_dims=2, size=32,
                           resize="pad-crop")
    assert torch.equal(padded[0, 2:30, 2:30], torch.from_numpy(GRAY / np.float32(255)))
    up = to_model_grid(image_from_array(GRAY), channels=1, spatial_dims=2, size=56)
    assert up.shape == (1, 56, 56)
    with pytest.raises(ConfigError, match="normalization"):
        to_model_grid(ct, channels=1, spatial_dims=2, size=8, normalize="magic")
    with pytest.raises(ConfigError, match="window"):
        to_model_grid(ct, channels=1, spatial_dims=2, size=8, normalize="window")
    with pytest.raises(DataError, match="WindowCenter"):
        to_model_grid(ct, channels=1, spatial_dims=2, size=8, normalize="window",
                      window="dicom")


def test_check_input_refuses_what_the_model_was_not_trained_on() -> None:
    from meddx.modalities.image.io import check_input

    spec = {"channels": 1, "spatial_dims": 2, "size": 28, "value_range": [0, 255]}
    check_input(read_image(png_bytes(GRAY), name="ok.png"), spec)  # passes silently
    ct = read_image(dicom_file("CT_small.dcm"))
    with pytest.raises(InputMismatchError, match="Modality is CT"):
        check_input(ct, {**spec, "dicom_modality": "MR"})
    with pytest.raises(InputMismatchError, match="-33792..31743"):
        check_input(ct, spec)
    with pytest.raises(InputMismatchError, match="3×3"):
        check_input(read_image(dicom_file("SC_rgb_small_odd.dcm")), {**spec, "channels": 3})
    with pytest.raises(InputMismatchError, match="blank"):
        check_input(image_from_array(np.zeros((28, 28), np.uint8)), spec)
    with pytest.raises(InputMismatchError, match="2D model"):
        check_input(read_image(dicom_file("rtdose.dcm")), spec)


def _mutations(raw: bytes, seeds: range, flips: int):
    import random

    for seed in seeds:
        rnd = random.Random(seed)
        data = bytearray(raw)
        for _ in range(flips):
            data[rnd.randrange(len(data))] = rnd.randrange(256)
        yield bytes(data[: rnd.randrange(len(data))] if seed % 3 == 0 else data)


@pytest.mark.parametrize(("source", "flips"), [
    ("MR_small_RLE.dcm", 20), ("JPEG2000.dcm", 20), ("png", 8), ("tiff", 8), ("nii", 5),
    ("npy", 5),
])
def test_damaged_files_only_raise_meddx_errors(source: str, flips: int, tmp_path: Path) -> None:
    """Random byte damage (fuzzing found these): never a crash, never a Rust panic escaping."""
    from meddx.errors import MeddxError

    if source.endswith(".dcm"):
        raw = Path(dicom_file(source)).read_bytes()
    elif source in ("png", "tiff"):
        raw = png_bytes(RGB, fmt=source.upper())
    elif source == "nii":
        nib.save(nib.Nifti1Image(RNG.random((6, 6, 6)).astype(np.float32),
                                 np.diag([-1.0, 2.0, 1.0, 1.0])), tmp_path / "v.nii")
        raw = (tmp_path / "v.nii").read_bytes()
    else:
        buf = io.BytesIO()
        np.save(buf, RNG.random((6, 6)))
        raw = buf.getvalue()
    for data in _mutations(raw, range(60), flips):
        with contextlib.suppress(MeddxError):
            read_image(data, name=f"damaged.{source}")
