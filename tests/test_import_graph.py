"""Imports point one way: entry points -> services -> primitives (``../shared/DESIGN.md``).

Read from the source (the AST of every module of ``hymtl/``), so an import inside a function
counts as much as one at the top: the graph has no circle, and no primitive imports a service.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "hymtl"
#: the rooms everything else may use; they import no service
PRIMITIVES = ("hymtl.errors", "hymtl.fileio", "hymtl.store", "hymtl.loading", "hymtl.runs")
SERVICES = ("hymtl.model", "hymtl.features", "hymtl.callbacks", "hymtl.data.datamodule")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The hymtl modules ``name`` imports, wherever the import statement is (``from a import b``
    names the submodule ``a.b`` when there is one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .a import b
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in known else base)
    return {module for module in found if module in known and module != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def test_no_module_of_hymtl_imports_itself_back():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [module, target]))
            elif target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_primitives_import_no_service():
    graph = _graph()

    def reached(module: str) -> set[str]:
        seen, todo = set(), [module]
        while todo:
            for target in graph[todo.pop()]:
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        return seen

    wrong = {primitive: sorted(reached(primitive) & set(SERVICES)) for primitive in PRIMITIVES}
    assert not any(wrong.values()), f"primitives reaching a service (directly or through others): {wrong}"
