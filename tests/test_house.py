"""The shape of the house (``../shared/DESIGN.md``), read from the source of ``hymtl/``: imports
point from the entry points to the services to the primitives, never back and never in a circle;
entry points are thin; functions are short.

Nothing is imported: every file is parsed (``ast``), so an import inside a function counts as
much as one at the top of a module, and so does one under ``if TYPE_CHECKING:``. A module's
edges are what it names: ``from hymtl.data import sources`` is an edge to ``hymtl.data.sources``,
``from hymtl.data import ImageFolderDataModule`` one to the package ``hymtl.data``; the implicit
import of a module's parent packages is not an edge (Python runs it before the module itself).
"""

from __future__ import annotations

import ast
import sys
from functools import lru_cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hymtl"

#: the commands (``python -m hymtl.<name>``): compose -> instantiate -> run -> return
ENTRY_POINTS = ("train", "eval", "predict", "export", "summarize", "serve", "lr_find")
#: the rooms everything else stands on: they import no service
PRIMITIVES = ("errors", "fileio", "store", "loading", "runs", "figures", "distributed", "simplify", "progress",
              "config", "signals", "runtime")
SERVICES = ("model", "features", "callbacks", "data.datamodule", "evaluation", "inference", "serving", "resume")
MAX_ENTRY_POINT_LINES = 120
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def modules() -> dict[str, Path]:
    """Every module of ``hymtl/`` by its dotted name."""
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


@lru_cache(maxsize=None)
def tree(name: str) -> ast.Module:
    path = modules()[name]
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _known(dotted: str) -> str | None:
    """The module ``dotted`` names, or the nearest package or module that holds it."""
    while dotted and dotted not in modules():
        dotted = dotted.rpartition(".")[0]
    return dotted or None


@lru_cache(maxsize=None)
def imports(name: str) -> frozenset[str]:
    """The hymtl modules ``name`` imports anywhere in its file (functions, ``TYPE_CHECKING`` too)."""
    is_package = modules()[name].name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per dot past the first
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                found.add(submodule if submodule in modules() else origin)
    resolved = {_known(dotted) for dotted in found if dotted == "hymtl" or dotted.startswith("hymtl.")}
    return frozenset(m for m in resolved if m is not None and m != name)


def _through_packages(name: str) -> set[str]:
    """What ``name`` imports, with what an imported package's ``__init__`` imports (a re-export)."""
    seen: set[str] = set()
    todo = list(imports(name))
    while todo:
        target = todo.pop()
        if target in seen:
            continue
        seen.add(target)
        if modules()[target].name == "__init__.py":
            todo.extend(imports(target))
    return seen


def import_cycles() -> list[list[str]]:
    """The strongly connected components of the import graph with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(imports(node)):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for name in sorted(modules()):
        if name not in index:
            visit(name)
    return components


def _cycle_path(component: list[str]) -> str:
    """One circle inside ``component``, as ``a -> b -> a`` (what to read to break it)."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}
    while True:
        following = sorted(t for t in imports(path[-1]) if t in members)
        back = [t for t in following if t in seen]
        if back:
            first = path.index(back[0])
            return " -> ".join(path[first:] + [back[0]])
        path.append(following[0])
        seen.add(following[0])


def functions() -> list[tuple[str, str, int]]:
    """``(module, qualified name, lines)`` of every function and method, nested ones too."""
    found = []

    def walk(node: ast.AST, module: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qualified = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    found.append((module, qualified, child.end_lineno - child.lineno + 1))
                walk(child, module, qualified + ".")
            else:
                walk(child, module, prefix)

    for name in modules():
        walk(tree(name), name, "")
    return found


# --------------------------------------------------------------------------- the tests
def test_the_rooms_named_here_exist():
    """A renamed room must be renamed here too, or the checks below would pass vacuously."""
    for room in (*ENTRY_POINTS, *PRIMITIVES, *SERVICES):
        assert f"hymtl.{room}" in modules(), room


def test_import_graph_has_no_cycle():
    cycles = import_cycles()
    assert not cycles, "import circles: " + "; ".join(_cycle_path(c) for c in cycles)


def test_no_primitive_imports_a_service():
    services = {f"hymtl.{s}" for s in SERVICES}
    breaches = sorted(f"hymtl.{p} -> {target}" for p in PRIMITIVES
                      for target in _through_packages(f"hymtl.{p}") if target in services)
    assert not breaches, breaches


def test_no_entry_point_imports_another():
    entries = {f"hymtl.{e}" for e in ENTRY_POINTS}
    breaches = sorted(f"{e} -> {target}" for e in sorted(entries) for target in imports(e) if target in entries)
    assert not breaches, breaches


def test_nothing_in_the_package_imports_an_entry_point():
    """Entry points are the top floor: a service that needs what one holds means it is in the wrong room."""
    entries = {f"hymtl.{e}" for e in ENTRY_POINTS}
    breaches = sorted(f"{name} -> {target}" for name in modules() if name not in entries
                      for target in imports(name) if target in entries)
    assert not breaches, breaches


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_point_is_thin(entry):
    lines = len(modules()[f"hymtl.{entry}"].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_ENTRY_POINT_LINES, f"hymtl/{entry}.py has {lines} lines"


def test_no_function_is_longer_than_80_lines():
    long = sorted(f"{module}.{name}: {lines} lines" for module, name, lines in functions() if lines > MAX_FUNCTION_LINES)
    assert not long, long


# --------------------------------------------------------------------------- the reader itself
def test_the_reader_sees_imports_inside_functions_and_relative_ones(tmp_path, monkeypatch):
    """The checks above are only as good as this reader: a known graph is read back exactly."""
    package = tmp_path / "hymtl"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from hymtl import b\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import hymtl.sub.c\n")
    (package / "sub" / "__init__.py").write_text("from .c import thing\n")
    (package / "sub" / "c.py").write_text("from ..a import f\nthing = 1\n" + "def long():\n" + "    x = 1\n" * 80)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    for cached in (modules, tree, imports):
        cached.cache_clear()
    try:
        assert imports("hymtl.a") == {"hymtl.b"} and imports("hymtl.b") == {"hymtl.sub.c"}
        assert imports("hymtl.sub") == {"hymtl.sub.c"} and imports("hymtl.sub.c") == {"hymtl.a"}
        assert import_cycles() == [["hymtl.a", "hymtl.b", "hymtl.sub.c"]]
        assert _cycle_path(["hymtl.a", "hymtl.b", "hymtl.sub.c"]) == "hymtl.a -> hymtl.b -> hymtl.sub.c -> hymtl.a"
        assert ("hymtl.sub.c", "long", 81) in functions()
    finally:
        for cached in (modules, tree, imports):
            cached.cache_clear()
