"""``meddx explain`` with ``--sequence`` / ``--smiles``, and its input errors; ``meddx predict``
shares the flags' checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from meddx.cli import app
from meddx.errors import ConfigError, DataError

PNG = b"\x89PNG\r\n\x1a\n"
SEQUENCE = "ACGTTATAATGCGCATTACGGATC"  # 24 bases, the tiny package's length


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG
    with Image.open(path) as im:
        assert im.size[0] > 0 and im.size[1] > 0


def test_explain_sequence_writes_the_ism_logo(tiny_sequence_package, tmp_path) -> None:
    out = tmp_path / "ism.png"
    r = invoke("explain", str(tiny_sequence_package.path), "--sequence", SEQUENCE,
               "--out", str(out))
    assert r.exit_code == 0, r.output
    assert_png(out)
    assert "explained '" in r.output and str(out.name) in r.output


def test_explain_smiles_writes_the_atom_contributions(tiny_molecule_package, tmp_path) -> None:
    out = tmp_path / "atoms.png"
    r = invoke("explain", str(tiny_molecule_package.path), "--smiles", "CCO", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert_png(out)


@pytest.mark.parametrize("inputs, said", [
    ([], "none was given"),
    (["CCO", "--smiles", "CCO"], "got SOURCE and --smiles"),
    (["--smiles", "CCO", "--sequence", SEQUENCE], "got --smiles and --sequence"),
])
def test_explain_needs_exactly_one_input(tiny_molecule_package, tmp_path, inputs,
                                         said) -> None:
    out = tmp_path / "x.png"
    r = invoke("explain", str(tiny_molecule_package.path), *inputs, "--out", str(out))
    assert isinstance(r.exception, ConfigError)
    assert "exactly one input" in str(r.exception) and said in str(r.exception)
    assert not out.exists()


def test_flags_of_another_modality_are_refused(tiny_molecule_package, tiny_sequence_package,
                                               tmp_path) -> None:
    r = invoke("explain", str(tiny_molecule_package.path), "--sequence", SEQUENCE,
               "--out", str(tmp_path / "x.png"))
    assert isinstance(r.exception, ConfigError)
    assert "--sequence is for sequence models; 'tox-tiny' is a molecule model" in str(r.exception)
    r = invoke("predict", str(tiny_sequence_package.path), "--smiles", "CCGT")
    assert isinstance(r.exception, ConfigError) and "--smiles is for molecule models" in str(
        r.exception)


def test_invalid_smiles_names_the_input(tiny_molecule_package, tmp_path) -> None:
    r = invoke("explain", str(tiny_molecule_package.path), "--smiles", "C1CC",
               "--out", str(tmp_path / "x.png"))
    assert isinstance(r.exception, DataError) and "invalid SMILES 'C1CC'" in str(r.exception)
    # as users see it: one line on stderr, exit code 2, no traceback
    proc = subprocess.run([str(Path(sys.executable).parent / "meddx"), "explain",
                           str(tiny_molecule_package.path), "--smiles", "C1CC",
                           "--out", str(tmp_path / "x.png")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "invalid SMILES 'C1CC'" in proc.stderr
    assert "Traceback" not in proc.stderr
