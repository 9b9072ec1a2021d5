"""The lock: constraints.txt pins every dependency pyproject.toml names, with ==, so that
`make install` installs what was tested (issue 23, point 12)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in (ROOT / "constraints.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"not an exact pin: {raw}"
        assert not req.url and not req.marker, f"constraints hold registry pins only: {raw}"
        name = canonicalize_name(req.name)
        assert name not in pins, f"{req.name} pinned twice"
        pins[name] = specs[0].version
    return pins


def _named() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    out = {}
    for line in lines:
        req = Requirement(line)
        if canonicalize_name(req.name) != "meddx":  # meddx[all]: the extras themselves
            out[canonicalize_name(req.name)] = req
    return out


def test_every_dependency_in_pyproject_is_pinned_exactly():
    pins = _pins()
    missing = sorted(n for n in _named() if n not in pins)
    assert not missing, f"not in constraints.txt (run `make lock`): {missing}"


def test_each_pin_satisfies_what_pyproject_allows():
    pins = _pins()
    wrong = [f"{name}=={pins[name]} vs {req.specifier}" for name, req in _named().items()
             if name in pins and not req.specifier.contains(pins[name], prereleases=True)]
    assert not wrong, wrong


def test_torch_is_pinned_to_the_cpu_wheel_make_install_installs_first():
    torch = re.search(r"^TORCH \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), flags=re.M)
    assert torch and _pins()["torch"] == torch.group(1)


def test_make_install_uses_the_constraints_and_lock_and_test_latest_exist():
    text = (ROOT / "Makefile").read_text()
    assert '-c $(CONSTRAINTS) -e ".[dev]"' in text
    assert re.search(r"^\$\(STAMP\): pyproject.toml \$\(CONSTRAINTS\)$", text, flags=re.M)
    for target in ("lock", "test-latest", "latest-venv"):
        assert re.search(rf"^{target}:", text, flags=re.M), target
