"""The package's rooms: where it lives, that every module imports on its own, and no import cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "wssi_audit"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = sorted(_module_name(p) for p in PACKAGE.rglob("*.py"))


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: not inside functions, not under TYPE_CHECKING."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        statement = stack.pop()
        if isinstance(statement, (ast.Import, ast.ImportFrom)):
            found.append(statement)
        elif isinstance(statement, ast.If) and not _is_type_checking(statement.test):
            stack.extend(statement.body + statement.orelse)
        elif isinstance(statement, ast.Try):
            stack.extend(statement.body + statement.orelse + statement.finalbody)
            for handler in statement.handlers:
                stack.extend(handler.body)
        elif isinstance(statement, ast.ClassDef):
            stack.extend(statement.body)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports at import time (`from . import x` counts as x)."""
    known = set(MODULES)
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        edges: set[str] = set()
        for node in _top_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve(module, path.name == "__init__.py", node)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
            edges.update(t for t in targets if t in known and t != module)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[module] = 2
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_package_sits_at_the_repository_root() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    assert "wssi_audit/__init__.py" in tracked
    assert not any(name.startswith("src/") for name in tracked)
    assert "wssi_audit/py.typed" in tracked


def test_no_import_cycle_inside_the_package() -> None:
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_sees_a_cycle() -> None:
    """Control: the check above could fail."""
    graph = import_graph()
    graph["wssi_audit.ir"] = {*graph["wssi_audit.ir"], "wssi_audit.auditing"}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    modules = [m for m in MODULES if m != "wssi_audit.__main__"]  # that one runs the CLI
    result = subprocess.run([sys.executable, "-c", script, *modules], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    version = subprocess.run([sys.executable, "-m", "wssi_audit", "--version"], cwd=ROOT, capture_output=True)
    assert version.returncode == 0 and version.stdout.startswith(b"wssi-audit ")
