"""The layer rules of docs/structure.md, read from the source with `ast` (nothing is imported):
which package may import which, and no import cycle among conveyor's modules. Imports inside
functions count (a lazy import that closes a cycle is still a cycle); those under
`if TYPE_CHECKING:` do not (they never run)."""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "conveyor"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(module: str, tree: ast.AST) -> set[str]:
    """Absolute names of the modules `tree` imports at run time."""
    names: set[str] = set()
    package = module if _modules()[module].name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # `from pkg import module` imports pkg.module
                full = f"{base}.{alias.name}"
                names.add(full if full in _modules() else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


@cache
def _graph() -> dict[str, frozenset[str]]:
    return {m: frozenset(_imported(m, ast.parse(p.read_text(), str(p)))) for m, p in _modules().items()}


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _violations(layer: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{m} imports {n}"
        for m, imports in _graph().items()
        if _in(m, layer)
        for n in imports
        if any(_in(n, f) for f in forbidden)
    )


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        (
            "conveyor.core",
            (
                "torch",
                "asyncio",
                "conveyor.tools",
                "conveyor.server",
                "conveyor.backends",
                "conveyor.engine",
                "conveyor.bench",
                "transformers",
                "httpx",
            ),
        ),
        ("conveyor.tools", ("conveyor.server", "conveyor.engine", "conveyor.backends", "conveyor.bench")),
        ("conveyor.engine", ("conveyor.server", "conveyor.bench")),
        ("conveyor.backends", ("conveyor.server", "conveyor.bench")),
        ("conveyor.server", ("conveyor.bench",)),
    ],
)
def test_a_layer_imports_nothing_above_it(layer: str, forbidden: tuple[str, ...]) -> None:
    assert _violations(layer, forbidden) == []


def test_parsers_import_only_the_standard_library_and_themselves() -> None:
    bad = sorted(
        f"{m} imports {n}"
        for m, imports in _graph().items()
        if _in(m, "conveyor.tools.parsers")
        for n in imports
        if not _in(n, "conveyor.tools.parsers") and n.partition(".")[0] not in sys.stdlib_module_names
    )
    assert bad == []


def test_config_imports_nothing_from_the_package() -> None:
    assert [n for n in _graph()["conveyor.config"] if _in(n, "conveyor")] == []


def test_no_import_cycle() -> None:
    graph = {m: {n for n in imports if n in _graph()} for m, imports in _graph().items()}
    cycles, state = [], dict.fromkeys(graph, 0)  # 0 new, 1 on the path, 2 done

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        for n in sorted(graph[module]):
            if state[n] == 1:
                cycles.append(" -> ".join([*path[path.index(n) :], n]))
            elif state[n] == 0:
                walk(n, [*path, n])
        state[module] = 2

    for module in sorted(graph):
        if state[module] == 0:
            walk(module, [module])
    assert cycles == []


def test_the_rules_see_imports() -> None:
    """The reader finds absolute, relative, lazy and `from package import module` imports."""
    graph = _graph()
    assert "conveyor.config" in graph["conveyor.engine.engine"]
    assert "conveyor.tools.parsers.events" in graph["conveyor.tools.parsers"]
    assert "conveyor.backends.remote" in graph["conveyor.backends"]  # inside a function
