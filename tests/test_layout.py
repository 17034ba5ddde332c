"""The package's import graph has no cycles: read from the source with `ast`, nothing is imported.

Two graphs: the imports that run when a module is imported (module level, outside `if TYPE_CHECKING`),
and those plus the lazy ones inside functions. Both must be acyclic: a lazy import only hides a
cycle from `import` time, the modules still depend on each other. `graphlib` (standard library)
finds the cycles.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

import moa_magic

ROOT = Path(moa_magic.__file__).parent
PACKAGE = "moa_magic"


def module_names() -> dict[str, Path]:
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, name: str, is_package: bool, known: set[str]):
    """(imported module, inside a function?) for every import of a module of the package."""
    found = []

    def target(module: str | None, level: int, alias: str | None) -> str | None:
        if level:
            base = name.split(".") if is_package else name.split(".")[:-1]
            base = base[: len(base) - (level - 1)]
            module = ".".join(base + ([module] if module else []))
        if module is None or not (module == PACKAGE or module.startswith(PACKAGE + ".")):
            return None
        if alias is not None and f"{module}.{alias}" in known:
            return f"{module}.{alias}"  # `from pkg import submodule`
        return module

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue  # annotations only: never executed
            lazy = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((target(a.name, 0, None), lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                found.extend((target(child.module, child.level, a.name), lazy) for a in child.names)
            visit(child, lazy)

    visit(tree, False)
    return [(module, lazy) for module, lazy in found if module is not None and module != name]


def import_graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = module_names()
    eager: dict[str, set[str]] = {name: set() for name in modules}
    every: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text("utf-8"))
        for module, lazy in _imports(tree, name, path.name == "__init__.py", set(modules)):
            assert module in modules, f"{name} imports {module}, which does not exist"
            every[name].add(module)
            if not lazy:
                eager[name].add(module)
    return eager, every


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        return exc.args[1]
    return None


def test_the_graph_reader_sees_the_imports_it_must():
    eager, every = import_graphs()
    assert "moa_magic.core.result" in eager["moa_magic.render.static"]
    assert "moa_magic.accounting.totals" in eager["moa_magic.core.result"]
    assert "moa_magic.notebook.magics" in every["moa_magic"] - eager["moa_magic"]  # lazy hook
    assert "moa_magic.core.result" not in eager["moa_magic.core.events"]  # TYPE_CHECKING only
    # and it finds a cycle when there is one
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None


@pytest.mark.parametrize("which", ["module level", "module and function level"])
def test_no_import_cycle_in_the_package(which):
    eager, every = import_graphs()
    found = cycle(eager if which == "module level" else every)
    assert found is None, f"import cycle ({which}): {' -> '.join(found)}"


def test_the_data_layers_never_import_a_renderer_or_a_front_end():
    """Data flows one way: core, providers and accounting know nothing of render or notebook."""
    _, every = import_graphs()
    lower = ("moa_magic.core", "moa_magic.providers", "moa_magic.accounting")
    upper = ("moa_magic.render", "moa_magic.notebook", "moa_magic.cli", "moa_magic.catalog")
    back_edges = sorted(
        f"{name} -> {module}"
        for name, modules in every.items() if name.startswith(lower)
        for module in modules if module.startswith(upper)
    )
    assert back_edges == []
