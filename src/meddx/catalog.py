"""Known datasets: name → modality, task, files and checksums, download address, license, citation.

Entries come from package data in the modality folders: each folder's ``catalog*.yaml`` (a new
modality adds its own; ``modalities/image/catalog-medmnist.yaml`` holds the 18 MedMNIST v2
subsets with their download addresses and MD5s).
Bundled copies are found under the data root (``MEDDX_DATA``, then ``../shared/data`` from the
working directory or the repository, then ``~/.cache/meddx/data``); nothing is downloaded unless
the user asks (:func:`download`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from meddx.errors import ConfigError, DataError
from meddx.registry import suggest
from meddx.tasks import TaskSpec

__all__ = [
    "DatasetEntry",
    "catalog",
    "get_entry",
    "data_roots",
    "resolve",
    "is_available",
    "download",
    "cache_dir",
    "recipe_for",
]

logger = logging.getLogger(__name__)

class DatasetEntry(BaseModel):
    """One known dataset.

    Args:
        name: catalog key.
        title: human name.
        modality: registry key of the modality that reads it.
        task: the label space.
        files: relative paths under the data root (may contain ``{size}`` / ``{suffix}``)
            mapped to ``{"md5": …}`` or ``{"sha256": …}`` (empty dict: not checked).
        urls: download address per file (same keys as ``files``), for users who are online.
        sizes: input sizes available (images).
        options: passed to the modality loader.
        stage: the command that stages the dataset from a local copy (data no download
            address reaches from here); named in the error when the files are missing.
        optional: benchmark data kept in the cache only: tests skip it when absent, even in CI.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    title: str
    modality: str
    task: TaskSpec
    description: str = ""
    license: str = "unknown"
    citation: str = ""
    homepage: str = ""
    files: dict[str, dict[str, str]] = Field(default_factory=dict)
    urls: dict[str, str] = Field(default_factory=dict)
    sizes: list[int] = Field(default_factory=list)
    default_size: int | None = None
    splits: dict[str, int] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)
    stage: str = ""
    optional: bool = False

    def file_keys(self, size: int | None = None) -> list[str]:
        """Relative paths for ``size`` (MedMNIST keeps one file per size)."""
        size = size or self.default_size
        suffix = "" if size in (None, 28) else f"_{size}"
        return [k.format(size=size, suffix=suffix) for k in self.files]


def _modalities_folder() -> Any:
    """``meddx/modalities/``, read as package data (each modality folder may hold a
    ``catalog.yaml`` and ``recipes/``); nothing is imported from it here."""
    return resources.files("meddx").joinpath("modalities")


@lru_cache(maxsize=1)
def catalog() -> dict[str, DatasetEntry]:
    """All known datasets, by name."""
    entries: dict[str, DatasetEntry] = {}
    items = [item for folder in _modalities_folder().iterdir() if folder.is_dir()
             for item in folder.iterdir() if item.name.startswith("catalog")
             and item.name.endswith((".yaml", ".yml"))]
    for item in sorted(items, key=lambda p: str(p)):
        for name, raw in (yaml.safe_load(item.read_text()) or {}).items():
            if name in entries:
                raise ConfigError(f"dataset '{name}' is defined twice", path=item.name)
            try:
                entries[name] = DatasetEntry.model_validate({"name": name, **raw})
            except ValueError as e:
                raise ConfigError(f"bad catalog entry '{name}': {e}", path=item.name) from e
    return entries


def get_entry(name: str) -> DatasetEntry:
    """The catalog entry for ``name``; unknown names get a suggestion."""
    entries = catalog()
    key = name.lower()
    if key not in entries:
        raise ConfigError(
            f"unknown dataset '{name}'" + suggest(key, list(entries)),
            hint="run `meddx datasets` to list them",
        )
    return entries[key]


def cache_dir() -> Path:
    """Writable cache (``MEDDX_CACHE`` or ``~/.cache/meddx``); bundled data is never written."""
    root = Path(os.environ.get("MEDDX_CACHE", Path.home() / ".cache" / "meddx"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def data_roots() -> list[Path]:
    """Folders searched for bundled data, in order."""
    roots: list[Path] = []
    env = os.environ.get("MEDDX_DATA")
    if env:
        roots.append(Path(env))
    roots.append(Path.cwd() / ".." / "shared" / "data")
    repo = Path(__file__).resolve().parents[2]
    roots.append(repo / ".." / "shared" / "data")
    roots.append(Path(os.environ.get("MEDDX_CACHE", Path.home() / ".cache" / "meddx")) / "data")
    seen, unique = set(), []
    for r in roots:
        key = str(r.resolve()) if r.exists() else str(r)
        if key not in seen:
            seen.add(key)
            unique.append(r.resolve() if r.exists() else r)
    return unique


def _find(rel: str) -> Path | None:
    for root in data_roots():
        p = root / rel
        if p.exists():
            return p
    return None


def is_available(entry: DatasetEntry | str, size: int | None = None) -> bool:
    """Whether every file of the dataset is found offline."""
    entry = get_entry(entry) if isinstance(entry, str) else entry
    return all(_find(k) is not None for k in entry.file_keys(size))


def resolve(entry: DatasetEntry | str, size: int | None = None) -> list[Path]:
    """Paths of the dataset's files, found under the data roots.

    Raises:
        DataError: a file is missing; the message says where meddx looked and how to get it.
    """
    entry = get_entry(entry) if isinstance(entry, str) else entry
    if size is not None and entry.sizes and size not in entry.sizes:
        raise ConfigError(
            f"dataset '{entry.name}' has no size {size}; available: {entry.sizes}",
        )
    paths = []
    for rel in entry.file_keys(size):
        found = _find(rel)
        if found is None:
            where = ", ".join(str(r) for r in data_roots())
            how = (
                f"run `meddx datasets --download {entry.name}"
                + (f" --size {size}" if size else "")
                + "` (needs internet)"
                if entry.urls
                else f"stage it: {entry.stage}" if entry.stage
                else f"get it from {entry.homepage or 'the source named in the catalog'}"
            )
            raise DataError(
                f"dataset '{entry.name}' is not available offline: {rel} not found",
                hint=f"looked in {where}; set MEDDX_DATA to its folder or {how}",
            )
        paths.append(found)
    return paths


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(name: str, size: int | None = None, *, progress: bool = True) -> Path:
    """Download a dataset file into the cache and check its MD5 (MedMNIST).

    Only called when the user asks (``meddx datasets --download``); needs internet.
    """
    entry = get_entry(name)
    if entry.urls and set(entry.urls) <= set(entry.files):  # one address per file, not per size
        return _download_files(entry, progress=progress)
    size = size or entry.default_size
    url = entry.urls.get(str(size))
    if not url:
        raise ConfigError(f"dataset '{name}' has no download address for size {size}")
    rel = entry.file_keys(size)[0]
    expected = next(iter(entry.files.values())).get(f"md5_{size}", "")
    return _fetch(url, cache_dir() / "data" / rel, name, {"md5": expected} if expected else {},
                  progress)


def _fetch(url: str, target: Path, name: str, checks: dict[str, str], progress: bool) -> Path:
    """Download ``url`` to ``target`` through a ``.part`` file, with a progress bar; every
    ``{algorithm: digest}`` in ``checks`` (md5, sha256) must match, else nothing is kept."""
    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".part")
    logger.info("downloading %s → %s", url, target)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, tmp.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            with tqdm(total=total, unit="B", unit_scale=True, disable=not progress) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"download of '{name}' failed: {e}",
                        hint="check the internet connection") from e
    for algorithm, expected in checks.items():
        if _digest(tmp, algorithm) != expected:
            tmp.unlink(missing_ok=True)
            raise DataError(f"download of '{name}' is corrupt ({algorithm} mismatch)",
                            path=target.name, hint="try again")
    tmp.replace(target)
    return target


def _download_files(entry: DatasetEntry, *, progress: bool = True) -> Path:
    """Download every file of an entry whose ``urls`` are keyed by file, check the MD5 (or
    SHA-256) where the catalog records one, and unpack zips beside them; returns their folder."""
    import zipfile

    root = cache_dir() / "data"
    for rel, url in entry.urls.items():
        checks = {a: d for a, d in entry.files.get(rel, {}).items() if a in ("md5", "sha256")}
        target = _fetch(url, root / rel, entry.name, checks, progress)
        if not checks:
            logger.warning("%s has no checksum in the catalog: compare its MD5 (%s) with %s",
                           rel, _digest(target, "md5"), entry.homepage or url)
        if target.suffix == ".zip":
            with zipfile.ZipFile(target) as archive:
                archive.extractall(target.parent)
    return root / Path(next(iter(entry.urls))).parent


def recipe_for(dataset: str) -> Path | None:
    """The shipped training recipe for a catalog dataset
    (``meddx/modalities/<modality>/recipes/<name>.yaml``, the settings the benchmarks measured;
    the repository's ``configs/`` links to them), or None when there is none."""
    for folder in _modalities_folder().iterdir():
        path = Path(str(folder.joinpath("recipes", f"{dataset}.yaml")))
        if path.is_file():
            return path
    return None
