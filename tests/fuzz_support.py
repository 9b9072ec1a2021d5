"""Fuzzing support shared by ``tests/test_fuzz_readers.py`` and ``benchmarks/fuzz.py``.

For every reader a user can reach, a seed corpus of real inputs (slices of the bundled data),
format-aware mutators, and a target that feeds one mutated input through the public entry point
(``get_modality(name).read(source, input_spec)``, the service's upload checks in
:mod:`meddx.serving.inputs`, the REST router's JSON decoding, the FHIR readers).

A case is ``(reader, seed)``: the seed picks the corpus file and the mutations, so a failing case
is reproduced by its number alone (``run_case("png", 1234)``). An outcome is ``accepted`` (the
input was read), ``rejected`` (a :class:`meddx.errors.MeddxError`: the project's own answer, with
its message) or ``crash`` (any other exception: a bug).
"""

from __future__ import annotations

import base64
import copy
import functools
import gzip
import io
import json
import random
import re
import struct
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meddx.catalog import data_roots
from meddx.errors import MeddxError

MAX_PIXELS = 4_000_000
MAX_DECODED_BYTES = 64 * 1024 * 1024  # the service default
INTERESTING_INTS = [0, 1, -1, 2, 7, 8, 15, 16, 255, 256, 65535, 65536, 2**31 - 1, -(2**31),
                    2**32 - 1, 2**63 - 1]
INTERESTING_TEXT = ["", "0", "-1", "NaN", "nan", "inf", "-inf", "1e308", "-1e308", "1e-320",
                    "99999999999999999999999", "0x10", " ", "abc", "1,5", "\x00", "é", "--", "+",
                    "1" * 400]


def data_path(rel: str) -> Path | None:
    """A bundled data file through the catalog's resolver (None when absent)."""
    for root in data_roots():
        if (root / rel).exists():
            return root / rel
    return None


class MissingData(RuntimeError):
    """Bundled data a reader's seed corpus needs is absent."""


def _need(rel: str) -> Path:
    p = data_path(rel)
    if p is None:
        raise MissingData(f"bundled data {rel} not found under {[str(r) for r in data_roots()]}")
    return p


# ------------------------------------------------------------------------------ seed corpora
def _png(arr: np.ndarray, **kw: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(arr: np.ndarray, **kw: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _breast(n: int = 3) -> list[np.ndarray]:
    with np.load(_need("medmnist/breastmnist.npz")) as d:
        return [d["test_images"][i] for i in range(n)]


def _retina() -> np.ndarray:
    with np.load(_need("medmnist/retinamnist.npz")) as d:
        return d["test_images"][0]


def _ct_pixels() -> np.ndarray:
    import pydicom

    return pydicom.dcmread(_need("dicom/CT_small.dcm")).pixel_array


def seeds_png() -> list[bytes]:
    ct = _ct_pixels().astype(np.int32)
    ct16 = (ct - ct.min()).astype(np.uint16)
    return [_png(a) for a in _breast()] + [_png(_retina()), _png(ct16)]


def seeds_jpeg() -> list[bytes]:
    from PIL import Image

    out = [_jpeg(a) for a in _breast()] + [_jpeg(_retina()), _jpeg(_breast(1)[0], progressive=True)]
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90°
    out.append(_jpeg(_breast(1)[0], exif=exif.tobytes()))
    return out


def seeds_dicom() -> list[bytes]:
    return [_need(f"dicom/{n}").read_bytes() for n in ("CT_small.dcm", "MR_small.dcm")]


def _nifti(arr: np.ndarray, gz: bool) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(arr, np.diag([1.5, 1.5, 2.0, 1.0]))
    raw = img.to_bytes()
    return gzip.compress(raw, mtime=0) if gz else raw


def seeds_nifti() -> list[bytes]:
    with np.load(_need("medmnist/adrenalmnist3d.npz")) as d:
        vols = [d["test_images"][i] for i in range(2)]
    return [_nifti(vols[0].astype(np.uint8), False),
            _nifti(vols[1].astype(np.float32) / 255.0, True),
            _nifti(vols[0].astype(np.int16) * 40 - 1000, False)]


def seeds_wfdb() -> list[dict[str, bytes]]:
    """MIT-BIH record 100 (format 212, 2 leads, 360 Hz) and Challenge 2015 v102s (212, 4
    signals), cut to their first 10 s (header sample count edited to match)."""
    out = []
    for name, fs, nsig in (("100", 360, 2), ("v102s", 250, 4)):
        n = 10 * fs
        head = _need(f"ecg/wfdb/{name}.hea").read_text()
        lines = head.splitlines()
        for i, line in enumerate(lines):
            if line.split() and line.split()[0] == name:
                lines[i] = f"{name} {nsig} {fs} {n}"
                break
        dat = _need(f"ecg/wfdb/{name}.dat").read_bytes()[: n * nsig * 3 // 2]
        out.append({f"{name}.hea": "\n".join(lines).encode() + b"\n", f"{name}.dat": dat})
    return out


def seeds_mat() -> list[dict[str, bytes]]:
    """PhysioNet 2017 .mat+.hea records (format 16+24, one lead, 300 Hz)."""
    root = _need("ecg/physionet2017")
    out = []
    for name in ("A00002", "A00004"):
        out.append({f"{name}.hea": (root / f"{name}.hea").read_bytes(),
                    f"{name}.mat": (root / f"{name}.mat").read_bytes()})
    return out


def _signal_2017(name: str = "A00002") -> np.ndarray:
    from meddx.modalities.ecg.io import read_wfdb

    return read_wfdb(_need(f"ecg/physionet2017/{name}.hea")).signal


def seeds_csv_ecg() -> list[bytes]:
    sig = _signal_2017()[:3000, 0]
    one = "# fs=300\nI\n" + "\n".join(f"{v:.4f}" for v in sig) + "\n"
    t = np.arange(3000) / 300
    two = "# fs: 300\ntime,I,II\n" + "\n".join(
        f"{a:.5f},{b:.4f},{-b:.4f}" for a, b in zip(t, sig, strict=True)) + "\n"
    bare = "# fs=300\n" + "\n".join(f"{v:.3f}" for v in sig[:1500]) + "\n"
    return [one.encode(), two.encode(), bare.encode()]


def seeds_fasta() -> list[bytes]:
    lines = _need("genomics/splice.csv").read_text().splitlines()[1:7]
    out = []
    for line in lines:
        _, donor, seq = (c.strip() for c in line.split(","))
        out.append(f">{donor}\n{seq[:30]}\n{seq[30:]}\n".encode())
    return out


def seeds_smiles() -> list[bytes]:
    lines = _need("molecules/tox21.csv").read_text().splitlines()[1:41:4]
    return [ln.split(",")[0].encode() for ln in lines]


STAYS = ("132539", "132540")


def seeds_physionet_text() -> list[bytes]:
    return [_need(f"ehr/physionet2012/set-a/{s}.txt").read_bytes() for s in STAYS]


def seeds_fhir_bundle() -> list[dict[str, Any]]:
    from meddx.modalities.ehr.fhir import physionet_to_bundle

    return [physionet_to_bundle(_need(f"ehr/physionet2012/set-a/{s}.txt")) for s in STAYS]


def seeds_fhir_image() -> list[dict[str, Any]]:
    png = base64.b64encode(_png(_breast(1)[0])).decode()
    jpg = base64.b64encode(_jpeg(_breast(2)[1])).decode()
    return [
        {"resourceType": "Binary", "contentType": "image/png", "data": png},
        {"resourceType": "Media", "status": "completed",
         "content": {"contentType": "image/jpeg", "data": jpg}},
        {"resourceType": "DocumentReference", "status": "current",
         "content": [{"attachment": {"contentType": "image/png", "data": png}}]},
    ]


def seeds_fhir_ecg() -> list[dict[str, Any]]:
    from meddx.modalities.ecg.fhir import record_to_observation
    from meddx.modalities.ecg.io import from_array

    sig = _signal_2017()[:3000, 0]
    return [record_to_observation(from_array(sig[None], 300.0, ["I"], "A00002"),
                                  subject="Patient/fuzz")]


# ------------------------------------------------------------------------------ byte mutators
def _flip(rng: random.Random, b: bytearray) -> None:
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)


def _set_bytes(rng: random.Random, b: bytearray) -> None:
    for _ in range(rng.randint(1, 4)):
        b[rng.randrange(len(b))] = rng.choice([0, 0xFF, 0x7F, 0x80, 0x01, 0x20])


def _truncate(rng: random.Random, b: bytearray) -> None:
    del b[rng.randrange(len(b)):]


def _delete(rng: random.Random, b: bytearray) -> None:
    i = rng.randrange(len(b))
    del b[i:i + rng.randint(1, 64)]


def _insert(rng: random.Random, b: bytearray) -> None:
    i = rng.randrange(len(b) + 1)
    b[i:i] = rng.choice([bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 32))),
                         b"\x00" * rng.randint(1, 4096), b"\xff" * 16])


def _splice(rng: random.Random, b: bytearray) -> None:
    i, j = rng.randrange(len(b)), rng.randrange(len(b))
    chunk = b[i:i + rng.randint(1, 256)]
    b[j:j] = chunk


def _header_int(rng: random.Random, b: bytearray, span: int = 512) -> None:
    """Overwrite a 2- or 4-byte integer near the start (where headers live)."""
    size = rng.choice([2, 4])
    i = rng.randrange(max(1, min(span, len(b) - size)))
    v = rng.choice(INTERESTING_INTS)
    fmt = rng.choice("<>") + ("h" if size == 2 else "i")
    lo, hi = (-(2**15), 2**15 - 1) if size == 2 else (-(2**31), 2**31 - 1)
    b[i:i + size] = struct.pack(fmt, max(lo, min(hi, v)))


BYTE_MUTATORS = [_flip, _set_bytes, _truncate, _delete, _insert, _splice, _header_int]


def mutate_bytes(rng: random.Random, data: bytes, rounds: int | None = None) -> bytes:
    b = bytearray(data)
    for _ in range(rounds or rng.randint(1, 3)):
        if not b:
            break
        rng.choice(BYTE_MUTATORS)(rng, b)
    return bytes(b)


# ------------------------------------------------------------------------------ text mutators
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def mutate_text(rng: random.Random, data: bytes) -> bytes:
    """Line- and field-level edits of a text format (numbers → huge/NaN/empty, fields dropped,
    lines repeated, separators changed), with an occasional byte-level pass."""
    text = data.decode("utf-8", errors="replace")
    lines = text.split("\n")
    for _ in range(rng.randint(1, 4)):
        if not lines:
            break
        i = rng.randrange(len(lines))
        op = rng.randrange(8)
        if op == 0:  # a number becomes something odd
            nums = list(_NUMBER.finditer(lines[i]))
            if nums:
                m = rng.choice(nums)
                lines[i] = lines[i][:m.start()] + rng.choice(INTERESTING_TEXT) + lines[i][m.end():]
        elif op == 1:  # a field dropped
            parts = re.split(r"([ ,\t])", lines[i])
            if len(parts) > 1:
                k = rng.randrange(0, len(parts), 2)
                del parts[k:k + 2]
                lines[i] = "".join(parts)
        elif op == 2:
            lines.insert(i, lines[i])
        elif op == 3:
            del lines[i]
        elif op == 4:
            lines[i] = lines[i].replace(rng.choice([",", " ", ":"]), rng.choice([";", "\t", ""]))
        elif op == 5:
            lines.insert(i, rng.choice(INTERESTING_TEXT) * rng.randint(1, 50))
        elif op == 6:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        else:
            lines[i] = lines[i] + rng.choice([",", ",,", " x", "\r", "#"])
    out = "\n".join(lines).encode("utf-8", errors="surrogateescape")
    if rng.random() < 0.25 and out:
        out = mutate_bytes(rng, out, 1)
    return out


# ------------------------------------------------------------------------------ JSON mutators
RESOURCE_TYPES = ["Patient", "Observation", "Encounter", "Bundle", "Binary", "Media",
                  "DocumentReference", "Condition", "Device", "", "Unknown", None, 7]


_DEEP = "__meddx_fuzz_deep_{}__"


def _odd_value(rng: random.Random) -> Any:
    return rng.choice([None, True, 0, -1, 1e308, float("nan"), float("inf"), "", "x" * 10_000,
                       [], {}, [None], {"": None}, "NaN", "2012-99-99T99:99", 2**70,
                       _DEEP.format(rng.choice([30, 3000, 100_000]))])


def _containers(obj: Any, path: tuple = (), depth: int = 0) -> list[tuple]:
    out = [path]
    if depth > 12:
        return out
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, dict | list):
                out += _containers(v, (*path, k), depth + 1)
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:50]):
            if isinstance(v, dict | list):
                out += _containers(v, (*path, i), depth + 1)
    return out


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _serialize(doc: Any) -> bytes:
    """JSON text of ``doc``; deep-nesting placeholders become ``[[[…]]]`` in the text (a
    document too deep for ``json.dumps`` itself)."""
    text = json.dumps(doc, allow_nan=True)
    return re.sub(r'"__meddx_fuzz_deep_(\d+)__"',
                  lambda m: "[" * int(m.group(1)) + "]" * int(m.group(1)), text).encode()


def mutate_json(rng: random.Random, doc: Any) -> bytes:
    """Structure mutations of a FHIR resource, returned as the JSON body a client would send:
    wrong resourceType, fields dropped, values of the wrong type, deep nesting, entries
    repeated; the result may no longer be an object, or (rarely) not JSON at all."""
    doc = copy.deepcopy(doc)
    if rng.random() < 0.03:
        return _serialize(_odd_value(rng))
    for _ in range(rng.randint(1, 4)):
        node = _get(doc, rng.choice(_containers(doc)))
        op = rng.randrange(6)
        if isinstance(node, dict) and node:
            key = rng.choice(list(node))
            if op == 0 and "resourceType" in node:
                node["resourceType"] = rng.choice(RESOURCE_TYPES)
            elif op in (0, 1):
                del node[key]
            elif op == 2:
                node[key] = _odd_value(rng)
            elif op == 3 and isinstance(node[key], str | int | float):
                node[key] = rng.choice(INTERESTING_TEXT + [str(v) for v in INTERESTING_INTS])
            elif op == 4:
                node[rng.choice(["extension", "resourceType", "data", "entry", "id", "_x"])] = \
                    _odd_value(rng)
            else:
                node[key] = [node[key]] if not isinstance(node[key], list) else node[key] * 2
        elif isinstance(node, list) and node:
            i = rng.randrange(len(node))
            if op < 2:
                del node[i]
            elif op < 4:
                node[i] = _odd_value(rng)
            else:
                node.extend(node[: rng.randint(1, 5)])
    body = _serialize(doc)
    return mutate_bytes(rng, body, 1) if rng.random() < 0.08 else body


# ------------------------------------------------------------------------------ specs
IMAGE_SPEC_2D = {"spatial_dims": 2, "channels": 1, "size": 28, "normalize": "dtype-range",
                 "format": "medmnist", "value_range": [0, 255]}
IMAGE_SPEC_2D_FOLDER = {"spatial_dims": 2, "channels": 3, "size": 32,
                        "normalize": "image-minmax", "format": "folder", "resize": "pad-crop"}
IMAGE_SPEC_3D = {"spatial_dims": 3, "channels": 1, "size": 28, "normalize": "image-minmax",
                 "format": "folder", "resize": "resize"}
ECG_SPEC = {"modality": "ecg", "leads": None, "fs": 100.0, "length": 500, "stride": 250,
            "min_seconds": 2.0, "channels": 1, "spatial_dims": 1, "normalize": "zscore",
            "aggregate": "mean"}
SEQ_SPEC = {"format": "dna-onehot", "alphabet": "ACGT", "iupac": "fractional", "channels": 4,
            "length": 60, "spatial_dims": 1, "size": 60, "reverse_complement": False}
MOL_SPEC = {"format": "smiles", "sanitize": True, "featurizer": "graph",
            "atom_features": "chemprop-v2", "atom_fdim": 72, "bond_fdim": 14}


@functools.cache
def ehr_spec() -> dict[str, Any]:
    """The EHR input spec a trained package holds, with statistics fitted on 20 real stays."""
    from meddx.modalities.ehr.features import (
        BINS,
        FEATURE_VERSION,
        STATIC_NAMES,
        bin_stay,
        fit_stats,
        layout,
    )
    from meddx.modalities.ehr.io import mapping_table_sha256, read_physionet_stay, series_variables

    root = _need("ehr/physionet2012/set-a")
    binned = [bin_stay(read_physionet_stay(p)) for p in sorted(root.glob("*.txt"))[:20]]
    stats = fit_stats(np.stack([b.values for b in binned]), np.stack([b.static for b in binned]))
    names = series_variables()
    lay = layout(len(names))
    return {"format": "physionet2012-hourly", "feature_version": FEATURE_VERSION,
            "variables": names, "static": list(STATIC_NAMES), "layout": lay,
            "channels": lay["valid"][1], "length": BINS, "bin_hours": 1, "window_hours": BINS,
            "stats": stats, "mapping_table_sha256": mapping_table_sha256(),
            "on_malformed": "warn", "min_train_hours": 6}


# ------------------------------------------------------------------------------ targets
def _serve_uploads(modality: str, spec: dict[str, Any], uploads: list[Any]) -> Any:
    """What :meth:`meddx.serving.engine.ServedModel.read` does with uploaded files: content
    type and pixel checks, grouping, the modality's reader, plausibility checks."""
    from meddx.modalities import get_modality
    from meddx.serving.inputs import check_upload

    mod = get_modality(modality)
    pixels = [check_upload(u, mod, MAX_PIXELS, MAX_DECODED_BYTES) for u in uploads]
    sources = mod.group_uploads([{"name": u.name, "data": u.data} for u in uploads])
    samples = [mod.read(s, spec) for s in sources]
    if len(pixels) != len(samples):  # files grouped into one input, as the engine does
        pixels = [None] * len(samples)
    for s, n in zip(samples, pixels, strict=True):
        mod.check_served(s, spec, n)
    return samples


def _serve_json(modality: str, spec: dict[str, Any], body: bytes) -> Any:
    """The REST router's JSON path on a raw body: ``_json_items`` (parsing, ``inputs`` lists,
    FHIR attachments) on a real Starlette request, then uploads or decoded sources."""
    import asyncio

    from starlette.requests import Request

    from meddx.modalities import get_modality
    from meddx.serving.inputs import Upload
    from meddx.serving.routers.predict import _json_items

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    request = Request({"type": "http", "method": "POST", "path": "/", "headers": [
        (b"content-type", b"application/fhir+json")], "query_string": b""}, receive)
    items, _ = asyncio.run(_json_items(request, get_modality(modality)))
    if all(isinstance(i, Upload) for i in items):
        return _serve_uploads(modality, spec, items)
    mod = get_modality(modality)
    samples = [mod.read(i[0], spec) for i in items if not isinstance(i, Upload)]
    for s in samples:
        mod.check_served(s, spec, None)
    return samples


def _image_target(ctype: str, suffix: str) -> Callable[[bytes, random.Random], Any]:
    def run(data: bytes, rng: random.Random) -> Any:
        from meddx.serving.inputs import Upload

        spec = rng.choice([IMAGE_SPEC_2D, IMAGE_SPEC_2D_FOLDER])
        return _serve_uploads("image", spec, [Upload(data, f"input{suffix}", ctype)])
    return run


def _run_nifti(data: bytes, rng: random.Random) -> Any:
    from meddx.serving.inputs import Upload

    gz = data.startswith(b"\x1f\x8b")
    name = "volume.nii.gz" if gz else "volume.nii"
    return _serve_uploads("image", IMAGE_SPEC_3D, [Upload(data, name, "application/x-nifti")])


def _run_wfdb(files: dict[str, bytes], rng: random.Random) -> Any:
    from meddx.serving.inputs import Upload

    lead = "MLII" if any(k.startswith("100.") for k in files) else "II"
    spec = dict(ECG_SPEC, leads=[rng.choice([lead, lead, lead, "I"])])
    uploads = [Upload(v, k, "application/octet-stream") for k, v in files.items()]
    return _serve_uploads("ecg", spec, uploads)


def _run_csv_ecg(data: bytes, rng: random.Random) -> Any:
    from meddx.modalities import get_modality

    with tempfile.TemporaryDirectory(prefix="meddx-fuzz-") as tmp:
        p = Path(tmp) / "ecg.csv"
        p.write_bytes(data)
        return get_modality("ecg").read(str(p), ECG_SPEC)


def _run_text(modality: str, spec: Callable[[], dict[str, Any]], suffix: str
              ) -> Callable[[bytes, random.Random], Any]:
    def run(data: bytes, rng: random.Random) -> Any:
        from meddx.modalities import get_modality

        mod = get_modality(modality)
        on_disk = suffix == ".txt" or (suffix == ".fasta" and rng.random() < 0.5)
        if on_disk:  # a file on disk, as the CLI reads it
            with tempfile.TemporaryDirectory(prefix="meddx-fuzz-") as tmp:
                p = Path(tmp) / f"input{suffix}"
                p.write_bytes(data)
                return mod.read(str(p), spec())
        return mod.read(data.decode("utf-8", errors="replace"), spec())  # text, as JSON sends it
    return run


def _run_fhir_bundle(body: bytes, rng: random.Random) -> Any:
    from meddx.modalities import get_modality

    if rng.random() < 0.5:  # bytes, as `meddx predict bundle.json` or an upload hands them over
        return get_modality("ehr").read(body, ehr_spec())
    return _serve_json("ehr", ehr_spec(), body)


def _run_fhir_image(doc: bytes, rng: random.Random) -> Any:
    return _serve_json("image", IMAGE_SPEC_2D, doc)


def _run_fhir_ecg(doc: bytes, rng: random.Random) -> Any:
    return _serve_json("ecg", dict(ECG_SPEC, leads=["I"]), doc)


def _mutate_files(rng: random.Random, files: dict[str, bytes]) -> dict[str, bytes]:
    out = dict(files)
    header = next(k for k in out if k.endswith(".hea"))
    if rng.random() < 0.55:
        out[header] = mutate_text(rng, out[header])
    else:
        signal = rng.choice([k for k in out if k != header])
        out[signal] = mutate_bytes(rng, out[signal])
    if rng.random() < 0.05:
        del out[rng.choice(list(out))]
    return out


def mutate_png(rng: random.Random, data: bytes) -> bytes:
    """Edit a chunk's bytes (IHDR fields most often) and fix its CRC, so the decoder gets past
    the checksum; else a plain byte mutation."""
    if rng.random() < 0.4:
        return mutate_bytes(rng, data)
    chunks, pos = [], 8
    while pos + 8 <= len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.append([data[pos + 4:pos + 8], bytearray(data[pos + 8:pos + 8 + n])])
        pos += 12 + n
    k = 0 if rng.random() < 0.6 else rng.randrange(len(chunks))
    if chunks[k][1]:
        chunks[k][1] = bytearray(mutate_bytes(rng, bytes(chunks[k][1])))
    out = bytearray(data[:8])
    for kind, body in chunks:
        out += struct.pack(">I", len(body)) + kind + body
        out += struct.pack(">I", zlib.crc32(kind + bytes(body)) & 0xFFFFFFFF)
    return bytes(out)


_DICOM_FIELDS = ["Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                 "PixelRepresentation", "SamplesPerPixel", "NumberOfFrames",
                 "PhotometricInterpretation", "RescaleSlope", "RescaleIntercept", "WindowCenter",
                 "WindowWidth", "PixelSpacing", "PlanarConfiguration", "Modality",
                 "SliceThickness", "ImageOrientationPatient"]


def mutate_dicom(rng: random.Random, data: bytes) -> bytes:
    """Edit a header element through pydicom (value, or deletion), or mutate bytes."""
    import pydicom

    if rng.random() < 0.4:
        return mutate_bytes(rng, data)
    ds = pydicom.dcmread(io.BytesIO(data))
    for _ in range(rng.randint(1, 2)):
        kw = rng.choice(_DICOM_FIELDS)
        if kw in ds and rng.random() < 0.3:
            delattr(ds, kw)
            continue
        try:
            if kw == "PhotometricInterpretation":
                ds.PhotometricInterpretation = rng.choice(
                    ["MONOCHROME1", "RGB", "PALETTE COLOR", "YBR_FULL", "", "XYZ"])
            elif kw == "Modality":
                ds.Modality = rng.choice(["CT", "MR", "US", "", "X" * 20])
            elif kw in ("PixelSpacing", "ImageOrientationPatient"):
                setattr(ds, kw, [rng.choice(["0", "-1", "1e308", "nan"]) for _ in range(2)])
            elif kw in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth",
                        "SliceThickness"):
                setattr(ds, kw, rng.choice(["0", "-1", "1e308", "NaN", "inf", "1\\2"]))
            else:
                setattr(ds, kw, rng.choice([0, 1, 2, 3, 7, 8, 12, 16, 32, 64, 65535]))
        except (ValueError, TypeError, OverflowError):
            continue
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


def mutate_nifti(rng: random.Random, data: bytes) -> bytes:
    """Edit the 348-byte header (dim, datatype, bitpix, pixdim, vox_offset, scl_*) or bytes."""
    gz = data.startswith(b"\x1f\x8b")
    raw = bytearray(gzip.decompress(data) if gz else data)
    if rng.random() < 0.6:
        offsets = {"dim": (40, "h", 8), "datatype": (70, "h", 1), "bitpix": (72, "h", 1),
                   "pixdim": (76, "f", 8), "vox_offset": (108, "f", 1),
                   "scl_slope": (112, "f", 1), "scl_inter": (116, "f", 1),
                   "sizeof_hdr": (0, "i", 1)}
        off, code, n = offsets[rng.choice(list(offsets))]
        i = rng.randrange(n)
        size = struct.calcsize(code)
        if code == "f":
            v = rng.choice([0.0, -1.0, 1e38, float("nan"), float("inf"), 1e-30])
        else:
            v = rng.choice(INTERESTING_INTS)
            lo, hi = (-(2**15), 2**15 - 1) if code == "h" else (-(2**31), 2**31 - 1)
            v = max(lo, min(hi, v))
        raw[off + i * size: off + (i + 1) * size] = struct.pack("<" + code, v)
    else:
        raw = bytearray(mutate_bytes(rng, bytes(raw)))
    return gzip.compress(bytes(raw), mtime=0) if gz and rng.random() < 0.9 else bytes(raw)


@dataclass(frozen=True)
class Target:
    """One reader under fuzz: its seed corpus, mutator and entry point."""

    name: str
    what: str
    seeds: Callable[[], list[Any]]
    mutate: Callable[[random.Random, Any], Any]
    run: Callable[[Any, random.Random], Any]


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("png", "PNG upload → serving/inputs.check_upload → image read → check_served",
           seeds_png, mutate_png, _image_target("image/png", ".png")),
    Target("jpeg", "JPEG upload → serving/inputs → image read", seeds_jpeg, mutate_bytes,
           _image_target("image/jpeg", ".jpg")),
    Target("dicom", "DICOM upload → serving/inputs → image/dicom.py", seeds_dicom, mutate_dicom,
           _image_target("application/dicom", ".dcm")),
    Target("nifti", "NIfTI (.nii, .nii.gz) upload → serving/inputs → image read (3D)",
           seeds_nifti, mutate_nifti, _run_nifti),
    Target("wfdb", "WFDB .hea+.dat upload (format 212) → ecg group_uploads → read",
           seeds_wfdb, _mutate_files, _run_wfdb),
    Target("mat", "PhysioNet 2017 .hea+.mat upload → ecg read", seeds_mat, _mutate_files,
           _run_wfdb),
    Target("csv_ecg", "CSV ECG file → ecg read", seeds_csv_ecg, mutate_text, _run_csv_ecg),
    Target("fasta", "FASTA file or text → sequence read", seeds_fasta, mutate_text,
           _run_text("sequence", lambda: SEQ_SPEC, ".fasta")),
    Target("smiles", "SMILES text → molecule read (RDKit + Chemprop graph)", seeds_smiles,
           mutate_text, _run_text("molecule", lambda: MOL_SPEC, "")),
    Target("physionet_text", "PhysioNet 2012 stay file → ehr read", seeds_physionet_text,
           mutate_text, _run_text("ehr", ehr_spec, ".txt")),
    Target("fhir_bundle", "FHIR Bundle (dict, bytes, REST JSON) → ehr read", seeds_fhir_bundle,
           mutate_json, _run_fhir_bundle),
    Target("fhir_image", "FHIR Binary/Media/DocumentReference → REST JSON → image read",
           seeds_fhir_image, mutate_json, _run_fhir_image),
    Target("fhir_ecg", "FHIR Observation (SampledData) → REST JSON → ecg read",
           seeds_fhir_ecg, mutate_json, _run_fhir_ecg),
]}


@functools.cache
def corpus(name: str) -> list[Any]:
    """A target's seed corpus (read once per process)."""
    return TARGETS[name].seeds()


@dataclass
class Outcome:
    """What one case did: ``accepted``, ``rejected`` (MeddxError) or ``crash``."""

    reader: str
    seed: int
    kind: str
    error: str | None = None
    message: str | None = None


def make_case(name: str, seed: int) -> tuple[Any, random.Random]:
    """The mutated input of case ``seed`` (and the generator the target draws options from)."""
    rng = random.Random(f"{name}:{seed}")
    base = rng.choice(corpus(name))
    return TARGETS[name].mutate(rng, base), rng


def seed_case(name: str, index: int) -> tuple[Any, random.Random]:
    """Corpus file ``index`` unmutated, in the form the target takes (the baseline)."""
    base = corpus(name)[index]
    return (_serialize(base) if TARGETS[name].mutate is mutate_json else base), \
        random.Random(index)


def run_case(name: str, seed: int) -> Outcome:
    """Run one case (a negative ``seed`` runs corpus file ``-seed - 1`` unmutated);
    exceptions outside :class:`MeddxError` come back as ``crash``."""
    case, rng = make_case(name, seed) if seed >= 0 else seed_case(name, -seed - 1)
    try:
        TARGETS[name].run(case, rng)
    except MeddxError as e:
        return Outcome(name, seed, "rejected", type(e).__name__, str(e)[:300])
    except RecursionError as e:
        return Outcome(name, seed, "crash", "RecursionError", str(e)[:300])
    except Exception as e:  # noqa: BLE001 — anything else is what the fuzzer is looking for
        return Outcome(name, seed, "crash", type(e).__name__, str(e)[:300])
    return Outcome(name, seed, "accepted")
