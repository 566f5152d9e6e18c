"""The import graph of the whole tree: `diffit/`, `pipeline/`, `cli/` and the scripts of `bench/` (`bench/x.py` is
the module `bench.x`). Two rules, each one test:

- no import cycle anywhere in the tree;
- the packages are layers, in the order of PACKAGES: a module imports modules of its own package or of the packages
  before it, never of one after it. So `diffit` imports no `pipeline`, `cli` or `bench`; `pipeline` no `cli` or
  `bench`; `cli` no `bench`; `bench` may import the other three (its scripts use `diffit` and `pipeline`).

Every import statement counts, also those inside functions (a lazy import only hides a cycle until the function
runs); imports under `if TYPE_CHECKING:` do not, since they never run. An edge goes to the module that is
executed: `from pipeline.core import shards` to `pipeline.core.shards`, `from pipeline.core.errors import X` to
`pipeline.core.errors`, `from pipeline.train import run_train` (a name, not a submodule) to
`pipeline/train/__init__.py`.
A cycle is a strongly connected component of that graph with more than one module (or a module importing itself).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("diffit", "pipeline", "cli", "bench")  # in layer order: each may import only those before it


def module_name(path: Path, root: Path = ROOT) -> str:
    """`pipeline/core/shards.py` -> `pipeline.core.shards`; `pipeline/core/__init__.py` -> `pipeline.core`."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    """Every module of the project's packages by dotted name."""
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom at any depth (functions, classes, try blocks), except under TYPE_CHECKING."""
    for node in ast.iter_child_nodes(tree):
        if _is_type_checking_block(node):
            yield from (child for orelse in node.orelse for child in _import_nodes_of(orelse))
            continue
        yield from _import_nodes_of(node)


def _import_nodes_of(node: ast.AST):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    else:
        yield from _import_nodes(node)


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that the module `name` (at `path`) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # A submodule named in `from PKG import sub` is that module; any other name is PKG's attribute.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        found.update(target for target in targets if target in modules)
    return found


@functools.cache  # parsed once per test session
def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with a cycle (Tarjan's algorithm, iterative), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
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
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    found.append(frozenset(component))
    return sorted(found, key=sorted)


def test_the_cycle_finder_finds_lazy_and_relative_imports(tmp_path):
    # A hand-made tree: a -> b at module level, b -> a inside a function (lazy), c -> c.d relative, d alone.
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import thing\n")
    (package / "b.py").write_text("def f():\n    from pkg import a\n")
    (package / "c.py").write_text("from . import d\n")
    (package / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\n")
    modules = {module_name(path, tmp_path): path for path in sorted(package.rglob("*.py"))}
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.d"}, "pkg.d": set()}
    assert cycles(graph) == [frozenset({"pkg.a", "pkg.b"})]


def test_no_import_cycle_in_the_tree():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(sorted(cycle)) for cycle in found)


def test_each_package_imports_only_its_own_and_the_packages_before_it():
    layer = {package: rank for rank, package in enumerate(PACKAGES)}
    upward = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for target in targets
        if layer[target.split(".")[0]] > layer[module.split(".")[0]]
    )
    assert not upward, "imports against the layer order " + " < ".join(PACKAGES) + ": " + "; ".join(upward)
