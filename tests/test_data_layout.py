"""The data stages stay readable: no import circle within alignment_pipelines/data (imports inside functions
count: a lazy import is still a dependency) and no module over 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import alignment_pipelines.data as data_package

DATA = Path(data_package.__file__).parent
PACKAGE = "alignment_pipelines.data"
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = path.relative_to(DATA).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PACKAGE, *parts))


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in DATA.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The data modules `path` imports, anywhere in it (`from pkg import mod` names the module mod)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {name for name in found if name in modules and name != PACKAGE}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_circle_finder_finds_a_circle_through_three_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert sorted(_circles(graph)) == [["a", "b", "c"], ["e"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_data_module_imports_one_that_imports_it_back():
    modules = _modules()
    graph = {name: _imports(path, modules) for name, path in modules.items()}
    assert graph[f"{PACKAGE}.validate.engine"] >= {f"{PACKAGE}.validate.router", f"{PACKAGE}.ingest.chunks"}
    assert _circles(graph) == []


def test_the_stages_import_only_earlier_stages():
    """ingest never imports validate or datasets; datasets never imports validate."""
    modules = _modules()
    order = {"ingest": 0, "validate": 1, "datasets": 2}
    allowed = {("validate", "datasets")}  # the engine writes the key file the key index reads; the gate hashes rows
    for name, path in modules.items():
        stage = name.split(".")[2] if name.count(".") >= 3 else None
        for target in _imports(path, modules):
            other = target.split(".")[2] if target.count(".") >= 3 else None
            if stage in order and other in order and order[other] > order[stage]:
                assert (stage, other) in allowed, f"{name} imports {target}"


def test_no_data_module_is_over_600_lines():
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in _modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
