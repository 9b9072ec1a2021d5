"""Decode speed of meddx's image readers: files per second for read_image + to_model_grid.

Run: ``nice -n 10 .venv/bin/python benchmarks/image_io.py`` (one thread). Writes
``benchmarks/results/image_io.json`` and ``.md``. Not a test.
"""

from __future__ import annotations

import io
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import torch
from _common import RESULTS as OUT  # noqa: E402
from PIL import Image

from meddx.catalog import get_entry, resolve
from meddx.modalities.image.folder import load_isic2017
from meddx.modalities.image.io import read_image, to_model_grid


def rate(fn: Callable[[], object], n: int) -> tuple[float, float]:
    """(files per wall second, files per CPU second): the machine is shared, so both."""
    fn()  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def cases(tmp: Path) -> dict[str, Callable[[], object]]:
    isic = resolve(get_entry("isic2017"))[0].parent
    jpeg = sorted((isic / "ISIC-2017_Training_Data").glob("*.jpg"))[0]
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), np.uint8)).save(buf, "PNG")
    png = buf.getvalue()
    vol = tmp / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((64, 64, 64)).astype(np.float32),
                             np.eye(4)), vol)
    ct = pydicom.data.get_testdata_file("CT_small.dcm", download=False)
    j2k = pydicom.data.get_testdata_file("MR_small_jp2klossless.dcm", download=False)
    ybr = pydicom.data.get_testdata_file("SC_rgb_jpeg_dcmtk.dcm", download=False)

    def grid(src, c, d, s, **kw):
        return lambda: to_model_grid(read_image(src, **kw), channels=c, spatial_dims=d, size=s)

    return {
        "PNG 28 px gray (bytes) → 28": grid(png, 1, 2, 28, name="x.png"),
        "ISIC JPEG 256 px → 64": grid(jpeg, 3, 2, 64),
        "ISIC JPEG 256 px → 224": grid(jpeg, 3, 2, 224),
        "DICOM CT 128 px (HU) → 64": grid(ct, 1, 2, 64),
        "DICOM MR 64 px JPEG 2000 lossless → 64": grid(j2k, 1, 2, 64),
        "DICOM RGB JPEG baseline YBR 100 px → 64": grid(ybr, 3, 2, 64),
        "NIfTI .nii.gz 64³ float → 64³": grid(vol, 1, 3, 64),
    }


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, fn in cases(Path(tmp)).items():
            wall, cpu = rate(fn, 30)
            rows.append({"case": label, "files_per_wall_s": round(wall, 1),
                         "files_per_cpu_s": round(cpu, 1)})
            print(f"{label:45s} {wall:8.1f} files/s wall, {cpu:8.1f} per CPU-second")
    root = resolve(get_entry("isic2017"))[0].parent
    start, cpu = time.perf_counter(), time.process_time()
    splits, _ = load_isic2017(root, input_spec={"channels": 3, "spatial_dims": 2, "size": 64},
                              preload=True)
    preload_s, preload_cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"ISIC 2017 preload of all {sum(map(len, splits.values()))} images at 64 px: "
          f"{preload_s:.1f} s wall, {preload_cpu:.1f} s CPU")
    result = {"machine": platform.processor() or platform.machine(), "threads": 1,
              "rows": rows, "isic2017_preload_64_wall_s": round(preload_s, 1),
              "isic2017_preload_64_cpu_s": round(preload_cpu, 1)}
    OUT.mkdir(exist_ok=True)
    (OUT / "image_io.json").write_text(json.dumps(result, indent=2))
    lines = ["| case | files/s wall | files per CPU-second |", "|---|---:|---:|"]
    lines += [f"| {r['case']} | {r['files_per_wall_s']} | {r['files_per_cpu_s']} |"
              for r in rows]
    lines.append(f"\nISIC 2017 preload, all 2,750 images at 64 px: {preload_s:.1f} s wall, "
                 f"{preload_cpu:.1f} s CPU (one thread, shared 2-core machine)")
    (OUT / "image_io.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
