"""A real labelled histology set, staged by hand: CRCHistoPhenotypes (colon, epithelial nuclei).

Sirinukunwattana et al. (IEEE TMI 2016) published 100 H&E images (500x500 px, 20x, about
0.55 µm/px) of colorectal adenocarcinoma in which every nucleus is marked and classed; 7,722
of them are epithelial. Ilse et al. (ICML 2018) turned it into a multiple-instance benchmark:
an image is positive when it holds at least one epithelial nucleus (51 of the 100). That
version (``imgN.bmp`` or ``imgN_epithelial.bmp``, plus ``imgN_epithelial.mat`` with the
epithelial centres as MATLAB ``detection`` (x, y), 1-based) is what public repositories carry;
this machine reaches no dataset host, so it is staged from such a snapshot.

:func:`stage` copies the 200 files under ``<data root>/pathology/crchistophenotypes/``, derives
``images.csv`` (image, label, number of epithelial centres; the label is checked against the
file name) and writes ``SHA256SUMS``. :func:`verify` checks every file against it.
:func:`build_tiles` cuts each image into a grid of tiles whose label says whether an
epithelial centre falls in the tile, and splits *by image* (tiles of one image never straddle
train and test); the images' patient of origin is not in this version, so images of one patient
can fall on both sides.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meddx.errors import ConfigError, DataError

__all__ = [
    "NAME",
    "REL",
    "MPP",
    "CLASSES",
    "TILE_CLASSES",
    "ImageRecord",
    "stage",
    "verify",
    "check_catalog",
    "locate",
    "read_images",
    "split_images",
    "tile_labels",
    "build_tiles",
]

logger = logging.getLogger(__name__)

NAME = "crchistophenotypes"
REL = f"pathology/{NAME}"
MPP = 0.55
CLASSES = ("no_epithelial", "epithelial")
TILE_CLASSES = ("other", "epithelial")
N_IMAGES = 100
_BMP = re.compile(r"^img(\d+)(_epithelial)?\.bmp$")
_STAGE_HINT = ("stage it from a snapshot that holds Data/ColonCancer: "
               "`meddx wsi stage crchistophenotypes SNAPSHOT`")


@dataclass(frozen=True)
class ImageRecord:
    """One staged image: id (``img17``), file, image label and epithelial centres (x, y)."""

    image_id: str
    path: Path
    label: str
    centres: np.ndarray


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_git_dir(path: Path) -> bool:
    return (path / "HEAD").is_file() and (path / "objects").is_dir()


def _find_colon(source: Path) -> Path:
    for cand in (source, source / "ColonCancer", source / "Data" / "ColonCancer"):
        if cand.is_dir() and any(_BMP.match(p.name) for p in cand.iterdir()):
            return cand
    raise DataError("no CRCHistoPhenotypes images (imgN.bmp / imgN_epithelial.bmp) found",
                    path=str(source), hint=_STAGE_HINT)


def _centres(mat: Path) -> np.ndarray:
    from scipy.io import loadmat

    try:
        raw = loadmat(str(mat)).get("detection")
    except (ValueError, OSError, TypeError) as e:
        raise DataError(f"cannot read {mat.name} ({e})", path=str(mat)) from e
    if raw is None:
        raise DataError(f"{mat.name} has no 'detection' array", path=str(mat))
    pts = np.asarray(raw, dtype=float).reshape(-1, 2) if raw.size else np.zeros((0, 2))
    return pts - 1.0  # MATLAB (x, y) are 1-based


def _check_source(colon: Path) -> list[tuple[str, Path, Path]]:
    """(id, bmp, mat) for every image; a missing pair or a mislabelled name is a DataError."""
    rows = []
    for bmp in sorted(colon.iterdir()):
        m = _BMP.match(bmp.name)
        if not m:
            continue
        image_id = f"img{m.group(1)}"
        mat = colon / f"{image_id}_epithelial.mat"
        if not mat.is_file():
            raise DataError(f"{bmp.name} has no {mat.name} beside it", path=str(colon))
        positive = len(_centres(mat)) > 0
        if positive != bool(m.group(2)):
            raise DataError(f"{bmp.name}: the file name and {mat.name} disagree on the label",
                            path=str(colon))
        rows.append((image_id, bmp, mat))
    if len(rows) != N_IMAGES:
        raise DataError(f"expected {N_IMAGES} images, found {len(rows)}", path=str(colon),
                        hint=_STAGE_HINT)
    return rows


def stage(source: str | Path, dest: str | Path | None = None) -> Path:
    """Copy CRCHistoPhenotypes from ``source`` into ``dest``, with a label table and SHA256SUMS.

    Args:
        source: a folder holding the images (itself, ``ColonCancer/`` or
            ``Data/ColonCancer/``), or the git directory of a repository snapshot that does
            (its ``HEAD`` is read with ``git archive``).
        dest: target folder (default ``<cache>/data/pathology/crchistophenotypes``, which the
            catalog searches).

    Returns:
        ``dest``.

    Raises:
        DataError: images missing, a name that contradicts its centres file, not 100 images.
    """
    from meddx.catalog import cache_dir

    source = Path(source)
    target = Path(dest) if dest else cache_dir() / "data" / REL
    if not source.exists():
        raise DataError("staging source not found", path=str(source), hint=_STAGE_HINT)
    with tempfile.TemporaryDirectory() as tmp:
        if _is_git_dir(source):
            source = _archive(source, Path(tmp))
        rows = _check_source(_find_colon(source))
        (target / "images").mkdir(parents=True, exist_ok=True)
        (target / "epithelial").mkdir(exist_ok=True)
        table = [("image", "file", "label", "n_epithelial")]
        for image_id, bmp, mat in rows:
            shutil.copyfile(bmp, target / "images" / bmp.name)
            shutil.copyfile(mat, target / "epithelial" / mat.name)
            n = len(_centres(mat))
            table.append((image_id, f"images/{bmp.name}", CLASSES[int(n > 0)], str(n)))
    with (target / "images.csv").open("w", newline="") as f:
        csv.writer(f).writerows(table)
    files = sorted(p for p in target.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    lines = [f"{_sha256(p)}  {p.relative_to(target).as_posix()}" for p in files]
    (target / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    logger.info("staged %d images of %s under %s", len(rows), NAME, target)
    return target


def _archive(git_dir: Path, tmp: Path) -> Path:
    """Extract the snapshot's HEAD into ``tmp`` (only the image folder when present)."""
    try:
        data = subprocess.run(["git", f"--git-dir={git_dir}", "archive", "--format=tar", "HEAD"],
                              capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise DataError(f"cannot read the snapshot with git archive ({e})",
                        path=str(git_dir)) from e
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = [m for m in tar.getmembers() if "ColonCancer/" in m.name and m.isfile()]
        tar.extractall(tmp, members=members, filter="data")
    return tmp


def verify(root: str | Path) -> int:
    """Check every file listed in ``root/SHA256SUMS``; returns how many were checked.

    Raises:
        DataError: the list is missing, a file is missing or differs.
    """
    root = Path(root)
    sums = root / "SHA256SUMS"
    if not sums.is_file():
        raise DataError("SHA256SUMS missing", path=str(root), hint=_STAGE_HINT)
    n = 0
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        digest, rel = line.split(None, 1)
        path = root / rel.strip()
        if not path.is_file():
            raise DataError(f"{rel.strip()} is listed in SHA256SUMS but missing", path=str(root),
                            hint=_STAGE_HINT)
        if _sha256(path) != digest:
            raise DataError(f"{rel.strip()} differs from SHA256SUMS (changed since staging)",
                            path=str(root), hint=_STAGE_HINT)
        n += 1
    return n


def check_catalog(root: str | Path) -> str:
    """Compare the staged label table and SHA256SUMS with the catalog's SHA-256s.

    Raises:
        DataError: they differ (a different copy, or the files changed since staging).
    """
    from meddx.catalog import get_entry

    root = Path(root)
    for rel, sums in get_entry(NAME).files.items():
        name = rel.rsplit("/", 1)[-1]
        path = root / name
        if not path.is_file():
            raise DataError(f"{name} missing", path=str(root), hint=_STAGE_HINT)
        if "sha256" in sums and _sha256(path) != sums["sha256"]:
            raise DataError(f"{name} differs from the catalog's SHA-256: not the copy the "
                            "benchmarks measured", path=str(root),
                            hint="stage again from the snapshot the catalog names")
    return "matches the catalog's SHA-256s"


def locate(check: bool = True) -> Path:
    """The staged folder, found like any catalog dataset (``MEDDX_DATA``, shared data, cache).

    Args:
        check: verify the catalog's SHA-256s and every file in SHA256SUMS.

    Raises:
        DataError: not staged (the message says where meddx looked and how to stage it), or
            changed since staging.
    """
    from meddx.catalog import resolve

    root = resolve(NAME)[0].parent
    if check:
        check_catalog(root)
        verify(root)
    return root


def read_images(root: str | Path) -> list[ImageRecord]:
    """The staged images with labels and epithelial centres, in ``images.csv`` order."""
    root = Path(root)
    table = root / "images.csv"
    if not table.is_file():
        raise DataError("images.csv missing", path=str(root), hint=_STAGE_HINT)
    out = []
    with table.open(newline="") as f:
        for row in csv.DictReader(f):
            mat = root / "epithelial" / f"{row['image']}_epithelial.mat"
            if row["label"] not in CLASSES:
                raise DataError(f"unknown label {row['label']!r}", path=str(table),
                                sample_id=row["image"])
            out.append(ImageRecord(row["image"], root / row["file"], row["label"],
                                   _centres(mat)))
    return out


def split_images(records: list[ImageRecord], seed: int = 0,
                 fractions: tuple[float, float] = (0.2, 0.2)) -> dict[str, str]:
    """image id → train/val/test, stratified by image label, the same for the same seed."""
    val_f, test_f = fractions
    if not (0 < val_f < 1 and 0 < test_f < 1 and val_f + test_f < 1):
        raise ConfigError(f"bad split fractions {fractions}: each in (0, 1), sum below 1")
    rng = np.random.default_rng(seed)
    out: dict[str, str] = {}
    for label in CLASSES:
        ids = sorted(r.image_id for r in records if r.label == label)
        ids = [ids[i] for i in rng.permutation(len(ids))]
        n_test, n_val = round(len(ids) * test_f), round(len(ids) * val_f)
        for i, image_id in enumerate(ids):
            out[image_id] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def tile_labels(centres: np.ndarray, shape: tuple[int, int], tile: int,
                offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """``(rows, cols)`` 0/1 grid: 1 where at least one centre (x, y) falls in the tile."""
    h, w = shape
    rows, cols = (h - offset[0]) // tile, (w - offset[1]) // tile
    grid = np.zeros((rows, cols), dtype=np.int64)
    if len(centres):
        r = np.floor((centres[:, 1] - offset[0]) / tile).astype(int)
        c = np.floor((centres[:, 0] - offset[1]) / tile).astype(int)
        inside = (r >= 0) & (r < rows) & (c >= 0) & (c < cols)
        grid[r[inside], c[inside]] = 1
    return grid


def build_tiles(root: str | Path, out: str | Path, tile: int = 64, seed: int = 0) -> Path:
    """Cut every staged image into a centred grid of ``tile`` px PNG tiles; write ``tiles.csv``.

    Columns: ``path,label,patient_id,split,image_label,row,col`` (``patient_id`` is the image
    id, so the folder loader keeps an image's tiles in one split; ``split`` from
    :func:`split_images`).
    """
    from PIL import Image

    if tile < 8:
        raise ConfigError(f"tile side {tile} px is too small (at least 8)")
    out = Path(out)
    (out / "tiles").mkdir(parents=True, exist_ok=True)
    records = read_images(root)
    splits = split_images(records, seed)
    lines = [("path", "label", "patient_id", "split", "image_label", "row", "col")]
    for rec in records:
        rgb = np.asarray(Image.open(rec.path).convert("RGB"))
        h, w = rgb.shape[:2]
        off = ((h % tile) // 2, (w % tile) // 2)
        labels = tile_labels(rec.centres, (h, w), tile, off)
        for (r, c), y in np.ndenumerate(labels):
            y0, x0 = off[0] + r * tile, off[1] + c * tile
            name = f"tiles/{rec.image_id}_r{r}_c{c}.png"
            Image.fromarray(rgb[y0:y0 + tile, x0:x0 + tile]).save(out / name)
            lines.append((name, TILE_CLASSES[int(y)], rec.image_id, splits[rec.image_id],
                          rec.label, str(r), str(c)))
    with (out / "tiles.csv").open("w", newline="") as f:
        csv.writer(f).writerows(lines)
    return out / "tiles.csv"
