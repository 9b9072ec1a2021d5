"""Static import graph of a package and the project's layer rule (used by test_layers.py).

Every ``import``/``from … import`` of the package's own modules is read from the source with
``ast``, at module level and inside functions alike (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# lowest first; a module may import its own layer and the layers below it, never above
LAYERS: tuple[tuple[str, ...], ...] = (
    ("meddx.version", "meddx.errors", "meddx.registry", "meddx.tasks", "meddx.config",
     "meddx.catalog", "meddx.fhir", "meddx.signing", "meddx.redaction", "meddx.sideinputs"),
    ("meddx.modalities",),
    ("meddx.models",),
    ("meddx.package",),
    ("meddx.statistics",),
    ("meddx.inference",),
    ("meddx.training",),
    ("meddx.explain",),
    ("meddx.reporting",),
    ("meddx.evaluation",),
    ("meddx.monitoring",),
    ("meddx.privacy",),
    ("meddx.dicom",),
    ("meddx.serving",),
    ("meddx.cluster",),
    ("meddx.commands", "meddx.cli"),
    ("meddx",),  # the package's face: the public API, imported lazily
)
# what the layers outside meddx.modalities may import of it: the registry and the contract
MODALITY_FACE = ("meddx.modalities", "meddx.modalities.base", "meddx.modalities.loading")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_edges(root: Path) -> tuple[set[str], list[Edge]]:
    """Modules under the package folder ``root`` and every import between them."""
    top = root.name
    files = {module_name(root, p): p for p in root.rglob("*.py")}
    edges: list[Edge] = []
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                # `from pkg import sub` names a module when pkg.sub is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                           for a in node.names]
            for target in targets:
                if target == top or target.startswith(top + "."):
                    while target not in files and "." in target:
                        target = target.rsplit(".", 1)[0]
                    if target != name:
                        edges.append(Edge(name, target, node.lineno))
    return set(files), edges


def layer_of(module: str, layers: Iterable[tuple[str, ...]] = LAYERS) -> int:
    best, index = -1, -1
    for i, prefixes in enumerate(layers):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, index = len(p), i
    return index


def upward(edges: Iterable[Edge], layers: tuple[tuple[str, ...], ...] = LAYERS) -> list[str]:
    """Imports from a lower layer into a higher one."""
    out = []
    for e in edges:
        a, b = layer_of(e.source, layers), layer_of(e.target, layers)
        if a < 0 or b < 0:
            out.append(f"{e.source} -> {e.target} (line {e.line}): module in no layer")
        elif b > a:
            out.append(f"{e.source} -> {e.target} (line {e.line}): layer {a} imports layer {b}")
    return out


def modality_leaks(edges: Iterable[Edge], package: str = "meddx.modalities",
                   modules: set[str] | None = None) -> list[str]:
    """Imports that reach into a modality folder from outside it: from another layer (they must
    go through the registry and the contract), from another modality folder, or from the
    shared modules of ``modalities/``. A folder is a sub-package of ``package``; its plain
    modules (base, loading, networks …) are the shared part everyone may use."""
    edges = list(edges)
    known = modules if modules is not None else {e.target for e in edges} | {
        e.source for e in edges}
    out = []
    for e in edges:
        if not e.target.startswith(package + "."):
            continue
        folder = e.target[len(package) + 1:].split(".")[0]
        if not any(m.startswith(f"{package}.{folder}.") for m in known):
            continue  # a shared module of modalities/, not a folder
        inside = e.source.startswith(f"{package}.{folder}.") or e.source == f"{package}.{folder}"
        if not inside:
            out.append(f"{e.source} -> {e.target} (line {e.line}): reaches into modality "
                       f"folder '{folder}'")
    return out


def circles(modules: set[str], edges: Iterable[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# branches on a modality's name outside its folder that are allowed, with the reason
NAME_BRANCH_ALLOWED: dict[tuple[str, str], str] = {
    ("evaluation/evaluator.py", "image"): "an error entry's 'image' field (its PNG), not the "
                                          "modality",
    ("modalities/pathology/embeddings.py", "image"): "a tile encoder is a package of the image "
                                                     "modality: the slide folder checks the "
                                                     "card it loads",
}


def _string_constants(node: ast.AST) -> list[tuple[str, int]]:
    """String constants of ``node`` itself or of a tuple/list/set literal it is."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [(node.value, node.lineno)]
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return [c for e in node.elts for c in _string_constants(e)]
    return []


def _named_in(node: ast.AST) -> list[tuple[str, int, str]]:
    """(constant, line, how) for the constants a comparison, a dict literal's keys or a
    ``match`` case test against."""
    if isinstance(node, ast.Compare):
        return [(v, n, "compared") for operand in (node.left, *node.comparators)
                for v, n in _string_constants(operand)]
    if isinstance(node, ast.Dict):
        return [(v, n, "a dict key") for k in node.keys if k is not None
                for v, n in _string_constants(k)]
    if isinstance(node, ast.MatchValue):
        return [(v, n, "a match case") for v, n in _string_constants(node.value)]
    return []


def modality_name_branches(root: Path, folders: dict[str, str],
                           allowed: dict[tuple[str, str], str] | None = None) -> list[str]:
    """Code that branches on a modality's name outside that modality's folder: a string
    constant equal to a registered modality name used in a comparison (``==``, ``!=``,
    ``in``), as a dict literal's key, or as a ``match`` case, anywhere under ``root`` except
    ``modalities/<folder>/``. Such code belongs in the modality's folder, behind the contract.
    ``folders``: modality name → the folder that registers it; ``allowed``: ``(module path
    relative to root, name)`` → why it is allowed."""
    allowed = NAME_BRANCH_ALLOWED if allowed is None else allowed
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        own = rel.parts[1] if len(rel.parts) > 2 and rel.parts[0] == "modalities" else None
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            for value, line, how in _named_in(node):
                if value in folders and folders[value] != own \
                        and (rel.as_posix(), value) not in allowed:
                    out.append(f"{rel.as_posix()}:{line}: modality name '{value}' {how} "
                               "outside its folder")
    return out
