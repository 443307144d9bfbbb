"""The package's shape: no import cycle (``TYPE_CHECKING`` imports included), every module in a layer of the
import-linter contract, no hidden function-level edges between our modules, no patched libraries.

``lint-imports`` (run by the README's test command) checks the layers themselves.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import grimp
import tomllib

PACKAGE = Path(__file__).resolve().parents[1] / "lumbar_ray"
PYPROJECT = PACKAGE.parent / "pyproject.toml"
# Modules whose function-level imports of our own modules defer heavy third-party packages on purpose: the CLI
# must answer --help and --version without importing torch, Ray and MLflow.
DEFERRING_ENTRY_POINTS = {"lumbar_ray.cli"}


def _graph() -> grimp.ImportGraph:
    return grimp.build_graph("lumbar_ray", exclude_type_checking_imports=False)


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return components


def test_no_import_cycle_even_counting_type_checking_imports() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for module in ("a", "a.x", "a.y", "a.z"):
        graph.add_module(module)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.z")
    graph.add_import(importer="a.z", imported="a.x")
    assert _cycles(graph) == [["a.x", "a.y", "a.z"]]


def _layer_modules() -> set[str]:
    contracts = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
    layers = next(contract for contract in contracts if contract["type"] == "layers")["layers"]
    return {name.strip() for layer in layers for name in re.split(r"[|:]", layer)}


def test_every_module_sits_in_a_layer() -> None:
    listed = _layer_modules()
    graph = _graph()
    for module in sorted(graph.modules):
        if module == "lumbar_ray" or graph.is_module_squashed(module):
            continue
        in_layer = any(module == name or module.startswith(f"{name}.") for name in listed)
        is_package_init = (PACKAGE.parent / module.replace(".", "/") / "__init__.py").is_file()
        assert in_layer or is_package_init, f"{module} is in no layer of the import-linter contract"


def _function_level_own_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("lumbar_ray"):
                found.append((inner.lineno, inner.module))
            elif isinstance(inner, ast.Import):
                found += [(inner.lineno, alias.name) for alias in inner.names if alias.name.startswith("lumbar_ray")]
    return found


def test_function_level_imports_never_hide_an_edge_between_our_modules() -> None:
    hidden = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if module not in DEFERRING_ENTRY_POINTS and (imports := _function_level_own_imports(path)):
            hidden[module] = imports
    assert hidden == {}


def test_no_library_is_patched_and_no_private_mlflow_attribute_is_used() -> None:
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"unittest\.mock|mock\.patch|from unittest import mock", line):
                offences.append(f"{path.name}:{number}: {line.strip()}")
            if re.search(r"\bmlflow(\.\w+)*\._\w", line) or re.search(r"\b(fluent|_tracking_service)\._\w", line):
                offences.append(f"{path.name}:{number}: {line.strip()}")
    assert offences == []
