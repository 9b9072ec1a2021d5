"""Usage errors on every command end in the usage line and a hint, exit 2, never a traceback.

Each case runs the real entry point (``meddx.cli:main``, what the ``meddx`` console script
calls) in its own process: one Python process imports the CLI once and forks a child per
case, whose stdout/stderr go to files, so ~60 invocations cost one import. The three commands
from the issue also run through the installed console script itself.
"""

from __future__ import annotations

import enum
import json
import subprocess
import sys
from pathlib import Path

import pytest

MEDDX = str(Path(sys.executable).parent / "meddx")

# Runs the cases given as JSON on argv[1]; prints one JSON line per case.
DRIVER = r'''
import json, os, sys, tempfile, traceback
import meddx.cli

def run(argv):
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
        sys.argv = ["meddx", *argv]
        code = 0
        try:
            meddx.cli.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()  # what the interpreter prints for an uncaught error
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    texts = []
    for f in (out, err):
        f.seek(0)
        texts.append(f.read().decode("utf-8", "replace"))
    return {"argv": argv, "rc": os.waitstatus_to_exitcode(status), "stdout": texts[0],
            "stderr": texts[1]}

for argv in json.loads(sys.argv[1]):
    print(json.dumps(run(argv)), flush=True)
'''


def _commands() -> list[tuple[list[str], object]]:
    """Every registered command and sub-command, found through the app itself."""
    import typer.main

    from meddx.cli import app

    root = typer.main.get_command(app)
    found: list[tuple[list[str], object]] = []

    def walk(cmd: object, path: list[str]) -> None:
        found.append((path, cmd))
        if hasattr(cmd, "list_commands"):
            ctx = cmd.make_context("meddx", [], resilient_parsing=True)  # type: ignore[attr-defined]
            for name in cmd.list_commands(ctx):  # type: ignore[attr-defined]
                walk(cmd.get_command(ctx, name), [*path, name])  # type: ignore[attr-defined]

    walk(root, [])
    return found


def _value(param: object) -> str:
    """A value the parser accepts for ``param``, so that only the surplus argument is wrong:
    the first choice of a choice, else "1" (an int, a float, a string, and a path that exists:
    the cases run in a folder holding a file named ``1``)."""
    choices = getattr(getattr(param, "type", None), "choices", None)
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if not choices and isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        choices = list(annotation)
    if choices:
        first = list(choices)[0]
        return str(first.value if isinstance(first, enum.Enum) else first)
    return "1"


def _cases() -> list[tuple[str, list[str], str]]:
    """(kind, argv, expected message) for each command: an unknown option; a missing
    required argument or option; a surplus argument; a misspelt sub-command of a group."""
    cases = []
    for path, cmd in _commands():
        params = getattr(cmd, "params", [])
        cases.append(("unknown option", [*path, "--no-such-option"], "no such option"))
        if hasattr(cmd, "list_commands"):
            cases.append(("unknown command", [*path, "no-such-command"], "no such command"))
            continue
        required = [p for p in params if p.required]
        if required:
            cases.append(("missing", list(path), "missing"))
        arguments = [p for p in params if p.param_type_name == "argument"]
        if any(p.nargs == -1 for p in arguments):
            continue  # a variadic argument takes any surplus
        given = [_value(p) for p in arguments]
        for p in required:
            if p.param_type_name == "option":
                given += [p.opts[0], _value(p)]
        cases.append(("extra", [*path, *given, "surplus-argument"], "unexpected extra argument"))
    return cases


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[tuple[str, ...], dict]:
    cases = _cases()
    folder = tmp_path_factory.mktemp("usage")
    (folder / "1").write_text("")  # "1" names an existing file for path arguments
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([c[1] for c in cases])],
                          capture_output=True, text=True, timeout=600, cwd=folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(cases), proc.stderr[-3000:]
    return {tuple(r["argv"]): r for r in rows}


def test_every_command_is_covered() -> None:
    kinds = {(k, a[0] if a else "") for k, a, _ in _cases()}
    names = {path[0] for path, _ in _commands() if path}
    assert {"train", "predict", "keys", "wsi", "validate"} <= names
    for name in names:
        assert ("unknown option", name) in kinds, name
    assert ("extra", "keys") in kinds and ("missing", "predict") in kinds


@pytest.mark.parametrize(("kind", "argv", "message"), _cases(),
                         ids=lambda x: " ".join(x) if isinstance(x, list) else str(x))
def test_usage_error_is_usage_and_hint_not_traceback(results, kind: str, argv: list[str],
                                                     message: str) -> None:
    r = results[tuple(argv)]
    text = r["stdout"] + r["stderr"]
    assert "Traceback" not in text, text
    assert r["rc"] == 2, text
    assert message in text.lower(), text
    command = " ".join(["meddx", *argv[: _depth(argv)]])
    assert f"Usage: {command}" in " ".join(r["stderr"].split()), text
    assert f"Try '{command} --help' for help" in r["stderr"], text


def _depth(argv: list[str]) -> int:
    """How many leading words of ``argv`` name a (sub-)command."""
    paths = {tuple(p) for p, _ in _commands()}
    depth = 0
    while depth < len(argv) and tuple(argv[: depth + 1]) in paths:
        depth += 1
    return depth


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["train", "--bogus"], ["predict"],
                                  ["keys", "sign-key", "release"]])
def test_the_console_script_prints_usage_not_a_traceback(argv: list[str]) -> None:
    proc = subprocess.run([MEDDX, *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("Usage: meddx " + " ".join(argv[:2 if argv[0] == "keys" else 1]))
    assert "--help' for help" in proc.stderr
