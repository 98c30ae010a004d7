"""The package's shape: imports at module top only, no cycle, and each layer imports only the layers below it.

Read from the source with `ast`, so an import hidden inside a function counts as much as one at the top.

Run: .venv/bin/pytest -q tests/test_import_graph.py
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "peftlite"

# Bottom to top; a module may import only modules of its own layer or of layers listed before it.
LAYERS = [
    ["storage"],
    ["config", "config_checks"],
    ["functional", "inits"],
    ["fast"],
    ["variants"],
    ["layers"],
    ["tuner"],
    ["io"],
    ["status", "peft_model"],
    ["__init__", "integrations"],
    ["app", "__main__"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def imports(path: Path) -> list[tuple[str, bool, bool]]:
    """(imported peftlite module, at module top, for annotations only) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module else [f"{target}.{alias.name}" for alias in node.names]
            if node.module:
                names += [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        type_only = _in_type_checking(tree, node)
        at_top = id(node) in top_level or type_only
        found += [(name, at_top, type_only) for name in names if name.split(".")[0] == "peftlite" and _exists(name)]
    return found


def _exists(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _in_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    """Imports under `if TYPE_CHECKING:` at module top are for annotations only."""
    for top in tree.body:
        if isinstance(top, ast.If) and isinstance(top.test, ast.Name) and top.test.id == "TYPE_CHECKING":
            if any(child is node for child in ast.walk(top)):
                return True
    return False


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        edges[module_name(path)] = {name for name, _, type_only in imports(path)
                                    if name != module_name(path) and not type_only}
    return edges


FILES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_of_the_package_sit_at_module_top(path):
    inside = sorted({name for name, at_top, _ in imports(path) if not at_top})
    assert not inside, f"{path.name} imports {inside} inside a function: move them to the top"


def test_the_import_graph_has_no_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target] if target in path else [module, target]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_each_layer_imports_only_layers_below_it():
    upward = []
    for module, targets in graph().items():
        upward += [f"{module} -> {t}" for t in sorted(targets)
                   if "." in t and "." in module and layer_of(t) > layer_of(module)]
    assert not upward, f"imports of a higher layer: {upward}"


def test_no_module_is_over_about_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in FILES if (n := len(p.read_text().splitlines())) > 420}
    assert not long, f"split these modules: {long}"
