"""mcpgw's import graph has no cycle, lazy imports inside functions included (issue 16).

The graph is read with ``ast`` from the source, so it sees every ``import`` wherever it is written.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mcpgw"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path.name == "__init__.py", node)
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                # The longest known module the target names (``from mcpgw.x import y``: mcpgw.x,
                # or mcpgw.x.y when y is a submodule).
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target != "mcpgw":
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """The first cycle a depth-first walk meets, as the modules along it (the first one repeated last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_mcpgw_imports_have_no_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_find_cycle_sees_a_cycle() -> None:
    """The walk itself: a cycle two modules away is found, a diamond is not one."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None


def test_import_graph_counts_lazy_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An import inside a function is an edge too (that is how the cycles hid)."""
    package = tmp_path / "mcpgw"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from mcpgw import b\n")
    (package / "b.py").write_text("def later():\n    from mcpgw.a import thing\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    assert find_cycle(import_graph()) == ["mcpgw.a", "mcpgw.b", "mcpgw.a"]


#: Issue 16: a module a reader can hold in mind, a function that fits on a screen.
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60


def _sizes(package: Path) -> tuple[list[str], list[str]]:
    modules, functions = [], []
    for path in sorted(package.rglob("*.py")):
        text = path.read_text()
        name = str(path.relative_to(package.parent))
        if text.count("\n") > MAX_MODULE_LINES:
            modules.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    functions.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    return modules, functions


def test_no_module_over_600_lines_and_no_function_over_60() -> None:
    modules, functions = _sizes(PACKAGE)
    assert not modules and not functions, "\n".join(["too long:", *modules, *functions])


def test_sizes_sees_a_long_function(tmp_path: Path) -> None:
    package = tmp_path / "mcpgw"
    package.mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (package / "long.py").write_text("def long():\n" + body)
    modules, functions = _sizes(package)
    assert modules == [] and functions == ["mcpgw/long.py:1 long: 61 lines"]
