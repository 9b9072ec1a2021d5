"""The layer rule: imports go one way (see tests/layering.py for the order), no import circles,
and the cross-cutting layers reach modalities only through the registry and the contract."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from layering import (
    LAYERS,
    NAME_BRANCH_ALLOWED,
    circles,
    import_edges,
    layer_of,
    modality_leaks,
    modality_name_branches,
    upward,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "meddx"


@pytest.fixture(scope="module")
def graph() -> tuple[set[str], list]:
    return import_edges(SRC)


def test_every_module_is_in_a_layer_and_no_import_runs_upward(graph) -> None:
    _, edges = graph
    assert upward(edges) == []


def test_no_import_circles(graph) -> None:
    modules, edges = graph
    assert circles(modules, edges) == []


def test_layers_outside_modalities_use_only_the_registry_and_the_contract(graph) -> None:
    modules, edges = graph
    assert modality_leaks(edges, modules=modules) == []


def _modality_folders() -> dict[str, str]:
    """Every registered modality name → the folder that registers it."""
    from meddx.modalities import registered

    return {name: target.split(":")[0].split(".")[2]
            for name, target in registered("MODALITIES").items()}


def test_nothing_branches_on_a_modality_name_outside_its_folder() -> None:
    """The service, the CLI and every other layer talk to the Modality contract: no
    ``modality == "image"``, no ``{"ecg": …}`` hint table (issue 23, point 10). Scans the
    whole tree, so code added in parallel is held to it too."""
    assert modality_name_branches(SRC, _modality_folders()) == []


def test_every_allowed_name_branch_still_exists() -> None:
    """An allow-list entry whose code is gone is removed, not kept as a blank cheque."""
    found = modality_name_branches(SRC, _modality_folders(), allowed={})
    for (module, name), reason in NAME_BRANCH_ALLOWED.items():
        assert reason
        assert any(f.startswith(f"{module}:") and f"'{name}'" in f for f in found), module


def test_planted_name_branches_are_caught(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "serving/inputs.py": """\
            def f(modality, kind):
                if modality == "image":
                    return 1
                if kind in ("ecg", "x"):
                    return 2
                match modality:
                    case "molecule":
                        return 3
                return {"ehr": "send a Bundle"}.get(modality, modality != "other")
            """,
        "modalities/image/modality.py": "def g(m):\n    return m == 'image'\n",
        "modalities/ehr/tabular.py": "def h(m):\n    return m == 'tabular'\n",
        "modalities/ecg/io.py": "def k(m):\n    return m == 'image'\n",
    })
    folders = {"image": "image", "ecg": "ecg", "molecule": "molecule", "ehr": "ehr",
               "tabular": "ehr"}
    assert modality_name_branches(root, folders, allowed={}) == [
        "modalities/ecg/io.py:2: modality name 'image' compared outside its folder",
        "serving/inputs.py:2: modality name 'image' compared outside its folder",
        "serving/inputs.py:4: modality name 'ecg' compared outside its folder",
        "serving/inputs.py:7: modality name 'molecule' a match case outside its folder",
        "serving/inputs.py:9: modality name 'ehr' a dict key outside its folder",
    ]


def test_the_graph_sees_lazy_and_relative_imports(graph) -> None:
    _, edges = graph
    pairs = {(e.source, e.target) for e in edges}
    # a lazy import inside a function (training fits post-hoc through the predictor)
    assert ("meddx.training.posthoc", "meddx.inference") in pairs
    assert ("meddx.models", "meddx.modalities") in pairs


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "meddx"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_a_planted_circle_and_an_upward_import_are_caught(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "__init__.py": "",
        "errors.py": "",
        "modalities/__init__.py": "from meddx.modalities import base\n",
        "modalities/base.py": "def f():\n    from meddx.serving import app\n",
        "modalities/ecg/__init__.py": "",
        "modalities/ecg/io.py": "from meddx.modalities.ecg import fhir\n",
        "modalities/ecg/fhir.py": "from . import io\n",
        "modalities/image/__init__.py": "",
        "modalities/image/io.py": "import meddx.modalities.ecg.io\n",
        "serving/__init__.py": "",
        "serving/app.py": "from meddx.modalities.ecg.fhir import x\nfrom meddx.errors import E\n",
    })
    modules, edges = import_edges(root)
    assert circles(modules, edges) == [["meddx.modalities.ecg.fhir", "meddx.modalities.ecg.io"]]
    assert upward(edges, LAYERS) == [
        "meddx.modalities.base -> meddx.serving.app (line 2): layer 1 imports layer "
        f"{layer_of('meddx.serving')}"]
    leaks = modality_leaks(edges, modules=modules)
    assert any(s.startswith("meddx.serving.app -> meddx.modalities.ecg.fhir") for s in leaks)
    assert any(s.startswith("meddx.modalities.image.io -> meddx.modalities.ecg.io")
               for s in leaks)
