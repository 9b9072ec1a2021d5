"""What an archive job runs over: the inputs of a SOURCE, each with a stable id.

A SOURCE is a folder (every input file under it; the id is the path relative to the folder)
or a CSV manifest with a ``path`` column and an optional ``id`` column (relative paths are
relative to the manifest). The id is what makes a job resumable: a rerun skips the ids that
are already in the results, so it must not change between runs.

A new kind of source (a DICOMweb study list once the PACS work lands) is one more entry in
:data:`LISTERS`: a ``detect(source) -> bool`` and a ``list(source, suffixes) -> [InputRef]``
whose ``source`` values are anything the model's ``Modality.read`` accepts (a path, or a
dict such as a DICOMweb retrieve description). Nothing else in the pipeline changes.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meddx.errors import ConfigError, DataError

__all__ = ["InputRef", "LISTERS", "list_inputs"]


@dataclass(frozen=True)
class InputRef:
    """One input of a job: its stable ``id`` and what ``Modality.read`` is given."""

    id: str
    source: Any


def _is_folder(source: str) -> bool:
    return Path(source).is_dir()


def _is_manifest(source: str) -> bool:
    return source.lower().endswith(".csv") and Path(source).is_file()


def _list_folder(source: str, suffixes: tuple[str, ...]) -> list[InputRef]:
    root = Path(source)
    files = sorted(f for f in root.rglob("*") if f.is_file()
                   and f.name.lower().endswith(suffixes) and f.suffix != ".mat")
    return [InputRef(f.relative_to(root).as_posix(), str(f)) for f in files]


def _list_manifest(source: str, suffixes: tuple[str, ...]) -> list[InputRef]:
    path = Path(source)
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if "path" not in (reader.fieldnames or []):
            raise ConfigError(f"manifest {path.name} has no 'path' column",
                              hint="a CSV with a header line: path[,id]", path=str(path))
        refs = []
        for line, row in enumerate(reader, start=2):
            raw = (row.get("path") or "").strip()
            if not raw:
                raise DataError(f"manifest line {line} has an empty path", path=str(path))
            p = Path(raw) if Path(raw).is_absolute() else path.parent / raw
            refs.append(InputRef((row.get("id") or "").strip() or raw, str(p)))
    return refs


# kind -> (detect, list); the first whose detect says yes lists the source
LISTERS: dict[str, tuple[Callable[[str], bool],
                         Callable[[str, tuple[str, ...]], list[InputRef]]]] = {
    "folder": (_is_folder, _list_folder),
    "manifest": (_is_manifest, _list_manifest),
}


def list_inputs(source: str | Path, suffixes: tuple[str, ...]) -> list[InputRef]:
    """The inputs of ``source``, in a stable order, with unique ids.

    Args:
        source: a folder or a CSV manifest (see the module docstring).
        suffixes: file endings a folder listing keeps (lower case).

    Raises:
        ConfigError: a source of no known kind, or one that lists nothing.
        DataError: two inputs with the same id (a rerun could not tell them apart).
    """
    text = str(source)
    for _kind, (detect, lister) in LISTERS.items():
        if detect(text):
            refs = lister(text, suffixes)
            break
    else:
        raise ConfigError(f"archive source {Path(text).name!r} is neither a folder nor a CSV "
                          "manifest", hint="give a folder of inputs or a CSV with a 'path' "
                          "column (and optionally 'id')")
    if not refs:
        raise ConfigError("the archive source lists no inputs", path=text,
                          hint="known input endings: " + " ".join(suffixes))
    seen: set[str] = set()
    for r in refs:
        if r.id in seen:
            raise DataError("two inputs share one id; ids must be unique for a resumable job",
                            hint="give the manifest an 'id' column", sample_id=r.id)
        seen.add(r.id)
    return refs
