"""Imports run one way: no module of reftkit imports, directly or through others, a module that imports it back.
Lazy imports inside functions count too (a cycle that only closes at call time is still a cycle of concepts)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import reftkit

PACKAGE = Path(reftkit.__file__).parent


def module_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """`{module: modules of the package it imports}` from every import statement of every file (top level and
    inside functions). A package's `__init__` is the package's own name."""
    modules: dict[str, tuple[Path, bool]] = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [source] + [f"{source}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_planted_cycle_and_nothing_else(tmp_path):
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("from .b import x\n")
    (root / "b.py").write_text("def f():\n    from .sub.c import y\n")  # a lazy import closes the cycle
    (root / "sub" / "__init__.py").write_text("")
    (root / "sub" / "c.py").write_text("from ..a import z\nimport pkg.d\n")
    (root / "d.py").write_text("from . import b\n")
    graph = module_graph(root)
    assert graph["pkg.sub.c"] == {"pkg.a", "pkg.d"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.d", "pkg.sub.c"]]
    (root / "d.py").write_text("")
    (root / "b.py").write_text("")
    assert cycles(module_graph(root)) == []


def test_reftkit_imports_run_one_way():
    graph = module_graph()
    assert {"reftkit.engine", "reftkit.io", "reftkit.cli", "reftkit.steer.apply"} <= set(graph)
    assert "reftkit.binding" in graph["reftkit.io"]  # the scan sees imports at all
    found = cycles(graph)
    if found:
        pytest.fail("import cycles (each a set of modules that import each other, lazily or not): " +
                    "; ".join(" <-> ".join(c) for c in found))
