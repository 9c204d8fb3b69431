"""The layout's rules (CONTRIBUTING.md), read from the code: every module imports, no import cycle among ftedge's
modules, nothing in ``formats/`` imports upward, and no runtime in ``backends/`` imports a stage.

Imports are read with a small AST walk over every ``ftedge/**/*.py``: module-level imports and those inside
functions both count (a lazy import is still a dependency); imports under ``if TYPE_CHECKING:`` do not.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import ftedge

ROOT = Path(ftedge.__file__).parent

# Import edges (importer, imported) that close a cycle today and belong to another part of issue 23;
# the lead empties this list once those land.
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()

FORMATS_MAY_IMPORT = ("ftedge.formats", "ftedge.errors", "ftedge.atomic")
STAGES = ("ftedge.train", "ftedge.merge", "ftedge.export", "ftedge.bench", "ftedge.ship", "ftedge.chat", "ftedge.serve")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _target(name: str) -> str | None:
    """The ftedge module an imported dotted name is (or lives in)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """The ftedge modules ``module`` imports, anywhere in its code but under ``if TYPE_CHECKING:``."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found: set[str] = set()
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from its package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    targets = {_target(name) for name in found if name == "ftedge" or name.startswith("ftedge.")}
    return {t for t in targets if t is not None and t != module}


GRAPH = {m: imports_of(m) for m in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_walk_sees_function_level_imports() -> None:
    """The walk is what the checks below rely on: a lazy import inside a function is an edge."""
    assert "ftedge.loader" in GRAPH["ftedge.backends.torch"]  # imported inside TorchBackend.__init__ only
    assert "ftedge.formats.gguf" in GRAPH["ftedge.basemodel"]  # imported inside locate_base_model only


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module: str) -> None:
    importlib.import_module(module)


def test_every_module_is_walked() -> None:
    found = {m.name for m in pkgutil.walk_packages(ftedge.__path__, "ftedge.")} | {"ftedge"}
    assert found == set(MODULES)


def test_no_import_cycle() -> None:
    graph = {m: {t for t in targets if (m, t) not in KNOWN_CYCLE_EDGES} for m, targets in GRAPH.items()}
    found = cycles(graph)
    detail = [[f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c] for c in found]
    assert found == [], detail


def test_known_cycle_edges_still_exist() -> None:
    """An allowed edge that is gone must leave the list (so the list only shrinks)."""
    assert [edge for edge in KNOWN_CYCLE_EDGES if edge[1] not in GRAPH.get(edge[0], set())] == []


def test_the_cycle_check_can_fail() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _within(module: str, roots: tuple[str, ...]) -> bool:
    return any(module == root or module.startswith(root + ".") for root in roots)


def test_formats_import_nothing_above_them() -> None:
    upward = {
        m: sorted(t for t in targets if not _within(t, FORMATS_MAY_IMPORT))
        for m, targets in GRAPH.items()
        if _within(m, ("ftedge.formats",))
    }
    assert {m: t for m, t in upward.items() if t} == {}


def test_backends_import_no_stage() -> None:
    staged = {m: sorted(t for t in targets if _within(t, STAGES)) for m, targets in GRAPH.items() if _within(m, ("ftedge.backends",))}
    assert {m: t for m, t in staged.items() if t} == {}
