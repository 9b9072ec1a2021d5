"""MkDocs hook: repository files outside ``docs/`` that the pages link to.

Pages link to benchmark results and recipes with paths that work when the Markdown is read in
the repository (``../benchmarks/results/icu_cv.md``, ``../configs/physionet2017.yaml``). MkDocs
cannot follow a link out of ``docs/``, so this hook publishes those two folders under
``repo/`` in the site and rewrites such links to the published copy; MkDocs then checks them
like any other link (``--strict`` fails on a missing file). A link to any other file outside
``docs/`` is a warning, so it fails the strict build too.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.repo_files")

PUBLISHED = ("benchmarks/results", "configs")
PREFIX = "repo"
_LINK = re.compile(r"(\]\()([^)\s#]+)(#[^)\s]*)?(\s+\"[^\"]*\")?(\))")


def _root(config) -> Path:
    return Path(os.path.abspath(config["config_file_path"])).parent


def on_files(files, config):
    root = _root(config)
    for folder in PUBLISHED:
        for path in sorted((root / folder).glob("*")):
            if path.suffix in (".md", ".yaml") and path.is_file():
                uri = f"{PREFIX}/{folder}/{path.name}"
                files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    root = _root(config)
    docs = Path(os.path.abspath(config["docs_dir"]))
    here = Path(os.path.abspath(page.file.abs_src_path)).parent

    def rewrite(m: re.Match) -> str:
        target = m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
            return m.group(0)
        # normpath, not resolve: configs/*.yaml are links into the modality folders
        resolved = Path(os.path.normpath(here / target))
        if resolved.is_relative_to(docs) or not resolved.is_relative_to(root):
            return m.group(0)
        rel = resolved.relative_to(root).as_posix()
        if not rel.startswith(tuple(f + "/" for f in PUBLISHED)):
            log.warning("%s links to %s, outside docs/; only %s are published",
                        page.file.src_uri, rel, ", ".join(PUBLISHED))
            return m.group(0)
        if not resolved.is_file():
            log.warning("%s links to %s, which does not exist", page.file.src_uri, rel)
            return m.group(0)
        new = posixpath.relpath(f"{PREFIX}/{rel}", posixpath.dirname(page.file.src_uri) or ".")
        return f"{m.group(1)}{new}{m.group(3) or ''}{m.group(4) or ''}{m.group(5)}"

    return _LINK.sub(rewrite, markdown)
