"""The layout rules of CONTRIBUTING.md, read from the code: no stage imports another; a runtime's API (and its
token-by-token generation loop, ``Backend.generate``) only in ftedge/backends/; the file formats bench and export
wrote by hand only in ftedge/formats/."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


RUNTIME_MODULES = ("llama_cpp", "onnxruntime_genai")


def _python_files() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted((REPO / "ftedge").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        yield rel, ast.parse(path.read_text(encoding="utf-8"), filename=rel)


def test_only_backends_run_a_generation_loop_or_import_a_runtime() -> None:
    """Outside ftedge/backends/, nobody calls a backend's ``generate`` (the per-token loop; ``stream`` consumes it) nor
    imports a runtime."""
    calls, imports = [], []
    for rel, tree in _python_files():
        if rel.startswith("ftedge/backends/"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "generate":
                calls.append(f"{rel}:{node.lineno}")
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n.split(".")[0] in RUNTIME_MODULES for n in names):
                imports.append(f"{rel}:{node.lineno}")
    assert calls == [], "per-token generation outside backends/ (use Backend.stream): " + ", ".join(calls)
    assert imports == [], "a runtime imported outside backends/: " + ", ".join(imports)


STAGES = ("validate", "train", "merge", "export", "bench", "ship", "chat", "serve", "datacheck")


def _stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "ftedge" and parts[1] in STAGES else None


def test_no_stage_imports_another_stage() -> None:
    """Stages meet in commands.py and the run's manifest, never by importing each other."""
    found = []
    for rel, tree in _python_files():
        own = _stage_of(rel.removesuffix(".py").replace("/", "."))
        if own is None:
            continue
        for node in ast.walk(tree):
            modules = []
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "ftedge" else [])
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            for module in modules:
                other = _stage_of(module)
                if other is not None and other != own:
                    found.append(f"{rel}:{node.lineno} imports {module}")
    assert found == [], "; ".join(found)


FORMAT_CALLS = {("np", "load"), ("np", "savez"), ("np", "savez_compressed"), ("gguf", "GGUFReader"), ("gguf", "GGUFWriter")}


def test_numpy_caches_and_gguf_files_are_read_and_written_only_in_formats() -> None:
    found = []
    for rel, tree in _python_files():
        if rel.startswith("ftedge/formats/"):
            continue
        for node in ast.walk(tree):
            func = node.func if isinstance(node, ast.Call) else None
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and (func.value.id, func.attr) in FORMAT_CALLS:
                found.append(f"{rel}:{node.lineno} {func.value.id}.{func.attr}")
    assert found == [], "a file format handled outside ftedge/formats/: " + ", ".join(found)
