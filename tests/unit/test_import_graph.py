"""The packages' import graph: no cycles between modules, and the layers of docs/modules.md.

Read from the source with `ast`, imports inside functions included (a lazy import still ties
two modules together; that is how the command line's modules used to import each other), and
imports under `if TYPE_CHECKING:` left out (they never run). Importing `a.b.c` also runs the
packages `a` and `a.b`; those implicit edges are left out too, else every package that
re-exports its modules would be a cycle. `from pkg import name` is an edge to `pkg.name` when
that is a module, else to the package `pkg` itself.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "mergesearch": ROOT / "operator" / "mergesearch",
    "mergerunner": ROOT / "runner" / "mergerunner",
}

# The pure core: decisions without I/O. None of them may reach, even through other modules, the
# kopf shell, the command line, local mode's loop, or a library that talks to a cluster.
PURE_CORE = (
    "mergesearch.engine",
    "mergesearch.spec",
    "mergesearch.searchconfig",
    "mergesearch.operator.reconcile",
    "mergerunner.trial",
    "mergerunner.contract",
    "mergerunner.placement",
)
SHELLS = (
    "mergesearch.cli",
    "mergesearch.local",
    "mergesearch.operator.__main__",
    "mergesearch.operator.handlers",
    "mergesearch.operator.kube",
    "mergesearch.operator.metrics",
    "mergesearch.operator.server",
    "mergerunner.cli",
    "mergerunner.run",
    "mergerunner.evaluator",
    "mergerunner.fetch",
    "mergerunner.storage",
)
CLUSTER_LIBRARIES = ("kopf", "kubernetes", "aiohttp", "prometheus_client")


def module_files() -> dict[str, Path]:
    """Every module of both packages by its dotted name (a package by its own name)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _runtime_nodes(tree: ast.Module) -> Iterator[ast.AST]:
    """Every node except the bodies of `if TYPE_CHECKING:` blocks."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: Path, modules: Iterable[str]) -> set[str]:
    """The modules `name` imports (inside the two packages or not), by dotted name."""
    known = set(modules)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            submodules = {f"{source}.{alias.name}" for alias in node.names} & known
            found.update(submodules)
            if len(submodules) < len(node.names):
                found.add(source)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
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
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def reachable(graph: Mapping[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through modules of the two packages."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _within(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_graph_sees_every_module_and_lazy_imports() -> None:
    graph = import_graph()
    assert {"mergesearch.cli.main", "mergesearch.operator.handlers", "mergerunner.merge"} <= set(
        graph
    )
    # `build_parser` imports the subcommands' modules inside the function.
    assert "mergesearch.cli.local" in graph["mergesearch.cli.main"]


def test_cycles_are_found() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_back() -> None:
    assert cycles(import_graph()) == []


def test_the_runner_never_imports_the_operator_package() -> None:
    graph = import_graph()
    wrong = {
        f"{name} -> {target}"
        for name, targets in graph.items()
        if name.startswith("mergerunner")
        for target in targets
        if _within(target, ["mergesearch"])
    }
    assert not wrong


# What each part may never import: the modes stay apart (the command line sits above both), and
# the engine stands on nothing of the modes or the resource.
NEVER_IMPORTS = {
    "mergesearch.operator": ("mergesearch.local", "mergesearch.cli"),
    "mergesearch.local": ("mergesearch.operator", "mergesearch.cli"),
    "mergesearch.engine": (
        "mergesearch.operator",
        "mergesearch.local",
        "mergesearch.cli",
        "mergesearch.spec",
    ),
}
# The operator side meets the runner only through the trial contract.
CONTRACT = ("mergerunner.trial", "mergerunner.contract")


@pytest.mark.parametrize("part", sorted(NEVER_IMPORTS))
def test_the_modes_stay_apart(part: str) -> None:
    graph = import_graph()
    wrong = {
        f"{name} -> {target}"
        for name, targets in graph.items()
        if _within(name, [part])
        for target in targets
        if _within(target, NEVER_IMPORTS[part])
    }
    assert sorted(wrong) == []


@pytest.mark.parametrize(
    "part",
    ["mergesearch.operator", "mergesearch.engine", "mergesearch.spec", "mergesearch.crd"],
)
def test_the_operator_side_meets_the_runner_only_through_the_contract(part: str) -> None:
    graph = import_graph()
    members = [name for name in graph if _within(name, [part])]
    reached = set().union(*(reachable(graph, name) for name in members))
    runner = {n for n in reached if _within(n, ["mergerunner"])}
    assert sorted(runner - set(CONTRACT)) == []


@pytest.mark.parametrize("core", PURE_CORE)
def test_the_pure_core_never_reaches_a_shell(core: str) -> None:
    graph = import_graph()
    members = [name for name in graph if _within(name, [core])]
    assert members, f"{core}: no such module"
    reached = set().union(*(reachable(graph, name) for name in members))
    assert sorted(n for n in reached if _within(n, SHELLS)) == []
    assert sorted(n for n in reached if _within(n, CLUSTER_LIBRARIES)) == []


@pytest.mark.parametrize(
    "core", ["mergesearch.engine", "mergesearch.spec", "mergesearch.operator", "mergerunner.trial"]
)
def test_what_the_operator_imports_never_pulls_torch(core: str) -> None:
    """The operator's image has no torch: neither it nor the core it imports may need it."""
    graph = import_graph()
    members = [name for name in graph if _within(name, [core])]
    reached = set().union(*(reachable(graph, name) for name in members))
    assert sorted(n for n in reached if _within(n, ["torch", "transformers", "lm_eval"])) == []


def test_the_module_map_lists_every_module_under_its_folder() -> None:
    """docs/modules.md has a section per package folder (its heading names the folder) whose
    table names each of the folder's modules, so a newcomer can check the map against the tree."""
    text = (ROOT / "docs" / "modules.md").read_text()
    sections = {}
    for part in text.split("\n## ")[1:]:
        heading, _, body = part.partition("\n")
        folder = re.search(r"`([\w/]+/)`", heading)
        if folder:
            sections[folder.group(1)] = set(re.findall(r"^\| `([\w.]+\.py)` \|", body, re.M))
    missing = []
    for path in module_files().values():
        folder = path.parent.relative_to(ROOT).as_posix() + "/"
        listed = sections.get(folder)
        if listed is None:
            missing.append(f"no section for {folder}")
        elif path.name != "__init__.py" and path.name not in listed:
            missing.append(f"{folder}{path.name}")
    assert sorted(set(missing)) == []
