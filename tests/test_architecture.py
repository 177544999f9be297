"""The import direction of docs/ARCHITECTURE.md, checked on the source: no circles, no upward imports.

Every import counts, function-local ones included: a lazy import that dodges a circle at run time is
still a circle in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = {
    "sdk": "rrise",
    "calibrate": "rrise.calibrate",
    "export": "rrise.export",
    "runtime": "rrise.runtime",
}
# The composition roots: the console entries dispatch to every stage (lazily, so `rrise --help` stays light).
ENTRY_MODULES = {"rrise.cli", "rrise.__main__"}


def _is_entry(module: str) -> bool:
    return module in ENTRY_MODULES or module.startswith("rrise.cli.")


# What each stage may import, besides itself (docs/ARCHITECTURE.md, "Data flow, in one direction").
ALLOWED = {
    "rrise": {"rrise"},
    "rrise.export": {"rrise", "rrise.export"},
    "rrise.runtime": {"rrise", "rrise.runtime"},
    "rrise.calibrate": {"rrise", "rrise.calibrate", "rrise.export", "rrise.runtime"},
}


def _modules() -> dict[str, Path]:
    modules = {}
    for folder, package in STAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(REPO / folder).with_suffix("").parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom, known: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    resolved = []
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            resolved.append(name)
    return resolved


def import_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports anywhere in its body."""
    modules = _modules()
    known = set(modules)
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps.update(_targets(module, path, node, known))
        deps.discard("rrise")  # the package's lazy public names are not a module dependency
        graph[module] = deps
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
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
                    circles.append(sorted(component))
    return circles


def _stage(module: str) -> str:
    for package in ("rrise.calibrate", "rrise.export", "rrise.runtime"):
        if module == package or module.startswith(package + "."):
            return package
    return "rrise"


def test_the_graph_sees_function_local_imports():
    graph = import_graph()
    assert "rrise.calibrate.mc" in graph
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    circles = import_circles(import_graph())
    assert circles == [], "modules that import each other in a loop: " + "; ".join(map(str, circles))


def test_no_stage_imports_a_later_one():
    upward = [
        f"{module} imports {dep}"
        for module, deps in import_graph().items()
        if not _is_entry(module)
        for dep in sorted(deps)
        if _stage(dep) not in ALLOWED[_stage(module)]
    ]
    assert upward == []


def test_functions_stay_short_and_take_few_parameters():
    """No function over 60 lines (docstring included) and none over 8 parameters (self and
    ``*args``/``**kwargs`` aside): longer lists belong in an option dataclass."""
    offenders = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            a = node.args
            names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
            params = len(names) - (1 if names[:1] in (["self"], ["cls"]) else 0)
            lines = node.end_lineno - node.lineno + 1
            if lines > 60 or params > 8:
                offenders.append(f"{module}.{node.name}: {lines} lines, {params} parameters")
    assert offenders == []
