"""The documentation tells the truth: every example in docs/ and README.md runs or parses.

* every shell line that starts with ``meddx `` is parsed by the real command line (the command
  exists, every option it uses exists, the arguments fit) without running it;
* every command and option of the CLI is on the CLI reference, every config key, modality
  option and service setting on the configuration reference;
* every ```python snippet runs in a scratch folder (unless an ``<!-- no-run: why -->`` comment
  stands on the line before its fence), with small packages and the inputs the pages name;
* the site builds with ``mkdocs build --strict`` (broken links, anchors, pages left out of nav).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer

from conftest import require_data

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
README = ROOT / "README.md"
NO_RUN = re.compile(r"<!--\s*no-run:\s*(.+?)\s*-->")
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}  # ```text: usage syntax
STOP_TOKENS = {">", ">>", "|", "||", "&&", ";", "<", "2>", "&"}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    no_run: str | None

    @property
    def where(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    """Fenced code blocks of a Markdown file, with the no-run reason written before them."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(`{3,})\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(2), m.group(3).lower(), i
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        reason = NO_RUN.search(prev)
        code = "\n".join(line[len(m.group(1)):] for line in lines[start + 1:j])
        blocks.append(Block(path, start + 1, lang, code, reason.group(1) if reason else None))
        i = j + 1
    return blocks


def meddx_lines(path: Path) -> list[tuple[str, str]]:
    """``(where, command line)`` for every shell line that runs ``meddx`` (continuations
    joined, an environment-variable prefix allowed)."""
    out = []
    for block in code_blocks(path):
        if block.lang not in SHELL_LANGS:
            continue
        joined = block.code.replace("\\\n", " ")
        for k, line in enumerate(joined.splitlines()):
            text = line.strip().removeprefix("$ ")
            words = text.split()
            while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
                words.pop(0)
            if words and words[0] == "meddx":
                out.append((f"{block.where}+{k + 1}", " ".join(words)))
    return out


def _root_command():
    from meddx.cli import app

    return typer.main.get_command(app)


def parse_cli(line: str) -> list[str]:
    """Parse a ``meddx …`` line with the real command line, without running anything.

    Returns the command path (e.g. ``["meddx", "keys", "token"]``). Raises the parser's
    usage error for an unknown command or option, a missing or surplus argument.
    """
    tokens = shlex.split(line, comments=True)
    for k, token in enumerate(tokens):
        if token in STOP_TOKENS:
            tokens = tokens[:k]
            break
    assert tokens and tokens[0] == "meddx", line
    cmd, args, path = _root_command(), tokens[1:], ["meddx"]
    ctx = cmd.make_context("meddx", list(args))
    while hasattr(cmd, "list_commands"):
        # the subcommand's name waits in protected_args (older Click: public, newer: private)
        protected = getattr(ctx, "protected_args", None) or getattr(ctx, "_protected_args", [])
        rest = [*protected, *ctx.args]
        if not rest:
            break
        name, sub, rest = cmd.resolve_command(ctx, list(rest))
        path.append(name)
        ctx = sub.make_context(name, list(rest), parent=ctx)
        cmd = sub
    return path


def _all_meddx_lines() -> list[tuple[str, str]]:
    return [item for page in [*PAGES, README] for item in meddx_lines(page)]


@pytest.mark.parametrize(("where", "line"), _all_meddx_lines(), ids=lambda x: str(x)[:60])
def test_documented_commands_parse(where: str, line: str) -> None:
    try:
        parse_cli(line)
    except Exception as e:  # the parser's UsageError (Typer vendors its own Click)
        pytest.fail(f"{where}: `{line}` does not parse: {e}")


@pytest.mark.parametrize("line", [
    "meddx train --dataset breastmnist --epoch 3",      # misspelt option
    "meddx trian --dataset breastmnist",                # misspelt command
    "meddx predict",                                    # missing MODEL
    "meddx keys tokn --key k.json",                     # misspelt subcommand
    "meddx evaluate runs/x/model --split test extra",   # surplus argument
])
def test_a_wrong_command_in_the_docs_would_fail(line: str) -> None:
    with pytest.raises(Exception, match=r"(?i)no such|missing|unexpected|got unexpected"):
        parse_cli(line)


def test_the_parser_sees_the_whole_command_path() -> None:
    assert parse_cli("meddx keys token --key k.json --iss a --aud b") == [
        "meddx", "keys", "token"]
    assert parse_cli("meddx fhir export-physionet2012 a.txt > b.json  # comment") == [
        "meddx", "fhir", "export-physionet2012"]
    assert meddx_lines(DOCS / "serving.md"), "the serving page's commands were not found"


def _commands(cmd=None, path=("meddx",)):
    from typer._click.core import Context  # noqa: PLC0415  (Typer's vendored Click)

    cmd = cmd or _root_command()
    ctx = Context(cmd)
    yield path, cmd
    if hasattr(cmd, "list_commands"):
        for name in cmd.list_commands(ctx):
            yield from _commands(cmd.get_command(ctx, name), (*path, name))


def _section(text: str, heading: str) -> str:
    """The part of a page under ``heading`` up to the next heading of its level or higher."""
    m = re.search(rf"^(#+) {re.escape(heading)}\s*$", text, flags=re.M)
    assert m, f"no heading {heading!r}"
    level = len(m.group(1))
    end = re.search(rf"^#{{1,{level}}} ", text[m.end():], flags=re.M)
    return text[m.end(): m.end() + end.start() if end else len(text)]


def test_every_cli_command_and_option_is_on_the_cli_reference() -> None:
    text = (DOCS / "cli.md").read_text()
    missing = []
    for path, cmd in _commands():
        if len(path) == 1:
            section = _section(text, "Global options")
        else:
            section = _section(text, "`" + " ".join(path) + "`")
        for param in cmd.params:
            names = (param.opts + param.secondary_opts if param.param_type_name == "option"
                     else [param.name.upper()])
            missing += [f"{' '.join(path)} {n}" for n in names if f"`{n}`" not in section]
    assert not missing, f"not on docs/cli.md: {missing}"


def _config_keys() -> list[str]:
    from meddx.config import ExperimentConfig

    def walk(model, prefix: str):
        for name, field in model.model_fields.items():
            yield prefix + name
            sub = field.annotation
            args = getattr(sub, "__args__", None) or ()
            for candidate in (sub, *args):
                if isinstance(candidate, type) and hasattr(candidate, "model_fields"):
                    yield from walk(candidate, f"{prefix}{name}.")

    return list(walk(ExperimentConfig, ""))


def test_every_config_key_is_on_the_configuration_reference() -> None:
    text = (DOCS / "configuration.md").read_text()
    keys = _config_keys()
    assert "train.augment.flips" in keys and "task.positive_class" in keys
    missing = [k for k in keys if f"`{k}`" not in text]
    assert not missing, f"not on docs/configuration.md: {missing}"


def test_every_modality_option_and_service_setting_is_on_the_configuration_reference() -> None:
    from meddx.modalities import MODALITIES
    from meddx.serving.settings import ServeSettings

    text = (DOCS / "configuration.md").read_text()
    missing = []
    for name in MODALITIES.names():
        section = _section(text, f"`data.options` for `{name}`")
        missing += [f"{name}: {k}" for k in MODALITIES.get(name).Options.model_fields
                    if f"`{k}`" not in section]
    section = _section(text, "Service settings (`ServeSettings`)")
    missing += [f"serve: {k}" for k in ServeSettings.model_fields if f"`{k}`" not in section]
    assert not missing, f"not on docs/configuration.md: {missing}"


def test_readme_links_point_at_files_that_exist() -> None:
    text = README.read_text()
    targets = re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text)
    assert targets, "the README links nowhere"
    missing = [t for t in targets if "://" not in t and not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_readme_is_an_entry_point() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert "make demo" in text and "make test" in text


def test_the_block_reader_sees_markers_and_languages(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("text\n\n<!-- no-run: needs a GPU -->\n```python\nimport x\n```\n\n"
                    "```bash\nmeddx models \\\n   --help\n```\n```python\nprint(1)\n```\n")
    first, shell, last = code_blocks(page)
    assert (first.lang, first.no_run, first.code) == ("python", "needs a GPU", "import x")
    assert shell.lang == "bash" and last.no_run is None
    assert [line for _, line in meddx_lines(page)] == ["meddx models --help"]


# --------------------------------------------------------------------------- python snippets
def _python_blocks() -> list[Block]:
    return [b for page in [*PAGES, README] for b in code_blocks(page) if b.lang in ("python", "py")]


def test_every_no_run_marker_says_why_and_marks_a_python_snippet() -> None:
    for page in [*PAGES, README]:
        lines = page.read_text().splitlines()
        fenced = False
        for i, line in enumerate(lines):
            if line.lstrip().startswith("```"):
                fenced = not fenced
            m = None if fenced else NO_RUN.search(line)
            if m:
                nxt = next((x for x in lines[i + 1:] if x.strip()), "")
                assert nxt.startswith("```python"), f"{page}:{i + 1}: marker before no snippet"
                assert len(m.group(1)) > 10, f"{page}:{i + 1}: say why it cannot run"


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        dst.symlink_to(src)
    except OSError:
        shutil.copy(src, dst)


@pytest.fixture(scope="session")
def docs_workdir(tmp_path_factory: pytest.TempPathFactory, tiny_breast_package) -> Path:
    """A scratch folder holding what the snippets name: packages under ``runs/`` and inputs."""
    import numpy as np
    from PIL import Image

    from meddx.training import train

    work = tmp_path_factory.mktemp("docs_work")
    (work / "runs" / "breast").mkdir(parents=True)
    shutil.copytree(tiny_breast_package.path, work / "runs" / "breast" / "model")
    (work / "configs").symlink_to(ROOT / "configs")

    images = np.load(require_data("medmnist/breastmnist.npz"))["test_images"]
    Image.fromarray(images[0]).save(work / "img.png")
    _link_or_copy(require_data("dicom/CT_small.dcm"), work / "scan.dcm")
    folder = work / "my_dataset" / "images"
    folder.mkdir(parents=True)
    rows = ["path,label,patient_id,age,sex"]
    for i in range(40):
        Image.fromarray(images[i]).save(folder / f"{i:03d}.png")
        rows.append(f"images/{i:03d}.png,{'pneumonia' if i % 3 == 0 else 'normal'},"
                    f"P{i // 2},{30 + i},{'F' if i % 2 else 'M'}")
    (work / "my_dataset" / "labels.csv").write_text("\n".join(rows) + "\n")

    for ext in ("hea", "mat"):
        _link_or_copy(require_data(f"ecg/physionet2017/A00005.{ext}"), work / f"A00005.{ext}")
    _link_or_copy(require_data("pathology/CMU-1-Small-Region.svs"),
                  work / "CMU-1-Small-Region.svs")
    _link_or_copy(require_data("ehr/physionet2012/set-a/132539.txt"),
                  work / "set-a" / "132539.txt")

    donor = "CCAGCTGCATCACAGGAGGCCAGCGAGCAGGTCTGTTCCAAGGGCCTTCGAGCCAGTCTG"
    (work / "window.fa").write_text(f">window\n{donor}\n")
    (work / "seq.fa").write_text(f">seq\n{donor}\n")
    require_data("genomics/splice.csv")
    train({"name": "splice-tiny", "seed": 0, "data": {"dataset": "splice", "limit": 120},
           "train": {"epochs": 1, "batch_size": 32, "early_stopping_patience": None}},
          out=work / "runs" / "splice", progress=False)
    require_data("ehr/physionet2012/Outcomes-a.txt")
    train({"name": "icu-tiny", "seed": 0,
           "data": {"dataset": "physionet2012", "limit": 150, "options": {"progress": False}},
           "model": {"name": "grud", "options": {"hidden": 16, "pooling": "mean_max",
                                                 "wide": True}},
           "train": {"epochs": 1, "batch_size": 64, "early_stopping_patience": None,
                     "threads": 1}},
          out=work / "runs" / "icu", progress=False)
    return work


@pytest.mark.slow
@pytest.mark.parametrize("block", _python_blocks(), ids=lambda b: b.where)
def test_python_snippet_runs(block: Block, docs_workdir: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    if block.no_run:
        pytest.skip(f"marked no-run: {block.no_run}")
    monkeypatch.chdir(docs_workdir)
    code = compile(block.code, block.where, "exec")
    exec(code, {"__name__": "__docs__"})  # noqa: S102  (the docs' own examples)


# --------------------------------------------------------------------------- the site
@pytest.mark.slow
def test_site_builds_strict(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).with_name("mkdocs")
    cmd = [str(mkdocs)] if mkdocs.exists() else [sys.executable, "-m", "mkdocs"]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([*cmd, "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "reference" / "inference.html").is_file()
    assert (tmp_path / "site" / "repo" / "benchmarks" / "results" / "icu_cv.html").is_file()
