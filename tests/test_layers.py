"""The import layering of ``src/strato`` (docs: ARCHITECTURE.md, "Layers") holds.

Every module is parsed with ``ast``; every ``import`` and ``from ... import`` is an edge,
at module level or inside a function (a lazy import is still a dependency), with
relative imports resolved; imports under ``if TYPE_CHECKING:`` are not (they never
run). ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else
to ``pkg``; importing a submodule is not counted as an edge to its parent package's
``__init__`` (Python runs it, but every package would then be a "cycle").

Checked: no import cycle among strato modules; no edge against the layers; the pure
layers (strategy, control) import no threads, clocks, environment or I/O; and the tests
of a sub-package live in the directory of ``tests/`` that mirrors it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
TESTS = ROOT / "tests"

# Top first. A module may import its own component (top-level sub-package or module),
# and components of lower layers; never a sibling of its own layer, never one above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("entry points", ("strato.cli", "strato.__main__")),
    ("applications", ("strato.fl", "strato.inference")),
    ("aggregation", ("strato.aggregation",)),
    ("pure policies", ("strato.strategy", "strato.control")),
    ("services", ("strato.services",)),
    ("backends", ("strato.backends",)),
    ("foundation", ("strato", "strato.params", "strato.codec", "strato.errors",
                    "strato.data")),
]  # fmt: skip
# Backends plug in from above: only the entry points import them (rule 1), and they
# import only these (rule 2: no application, no aggregation, no command line).
BACKEND_MAY_IMPORT = ("strato.services", "strato.params", "strato.codec", "strato.errors",
                      "strato")  # fmt: skip
PURE = ("strato.strategy", "strato.control")
# Threads, processes, clocks, environment, files and network: none in a pure layer.
IMPURE_MODULES = {"os", "threading", "_thread", "concurrent", "multiprocessing", "subprocess",
                  "socket", "select", "selectors", "signal", "asyncio", "time", "sched",
                  "urllib", "http", "sqlite3", "shutil", "tempfile", "pathlib", "glob"}  # fmt: skip
IMPURE_NAMES = {"open", "environ", "getenv", "putenv", "input"}

# Known violations in files other people are changing: (importer, imported) -> the fix.
# Each must still occur (a fixed one fails the test until its entry is removed).
KNOWN_EDGES: dict[tuple[str, str], str] = {}
# Test files whose sub-package has no mirrored directory yet: path -> where they go.
KNOWN_MISPLACED_TESTS: dict[str, str] = {
    # its handlers are loaded by module name from tests/ (a move needs them split out)
    "tests/test_runtime_process.py": "tests/services/",
    "tests/test_shm.py": "tests/services/",
}
# Test directories that cut across packages on purpose (no src package to mirror).
CROSS_CUTTING_TESTS = ("conformance", "benchmarks")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    lazy: bool  # inside a function

    def __str__(self) -> str:
        where = "inside a function" if self.lazy else "at module level"
        return f"{self.source} → {self.target} (line {self.line}, {where})"


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def find_modules(src: Path, package: str = "strato") -> dict[str, Path]:
    return {module_name(p, src): p for p in sorted((src / package).rglob("*.py"))}


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(source: str, module: str, is_package: bool) -> list[tuple[str, int, bool]]:
    """(imported name, line, inside a function) of every import that can run."""
    found: list[tuple[str, int, bool]] = []
    package = module.split(".") if is_package else module.split(".")[:-1]

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child.test):
                for stmt in child.orelse:  # the else branch does run
                    visit_stmt(stmt, lazy)
                continue
            visit_stmt(child, lazy)

    def visit_stmt(child: ast.AST, lazy: bool) -> None:
        if isinstance(child, ast.Import):
            found.extend((alias.name, child.lineno, lazy) for alias in child.names)
        elif isinstance(child, ast.ImportFrom):
            if child.level:
                base = package[: len(package) - (child.level - 1)]
                origin = ".".join(base + ([child.module] if child.module else []))
            else:
                origin = child.module or ""
            # pkg.name: resolved later to the module pkg.name if there is one, else pkg
            found.extend((f"{origin}.{a.name}", child.lineno, lazy) for a in child.names)
        inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        visit(child, inner)

    visit(ast.parse(source), False)
    return found


def build_graph(modules: Mapping[str, Path]) -> dict[str, list[Edge]]:
    """Module -> its edges to other strato modules."""
    graph: dict[str, list[Edge]] = {}
    for name, path in modules.items():
        edges: dict[str, Edge] = {}
        for imported, line, lazy in imports_of(path.read_text(), name, path.stem == "__init__"):
            if imported != "strato" and not imported.startswith("strato."):
                continue
            target = imported  # the longest prefix that is a module
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target == name or target not in modules:
                continue
            if target not in edges or (edges[target].lazy and not lazy):
                edges[target] = Edge(name, target, line, lazy)
        graph[name] = sorted(edges.values(), key=lambda e: e.target)
    return graph


def find_cycles(graph: Mapping[str, Iterable[Edge]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    targets = {m: [e.target for e in edges] for m, edges in graph.items()}

    def connect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in targets.get(v, []):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(targets):
        if v not in index:
            connect(v)
    cycles = []
    for component in components:
        start = min(component)
        path, seen = [start], {start}
        while True:  # walk inside the component until a module repeats
            nxt = next(w for w in targets[path[-1]] if w in component)
            if nxt in seen:
                cycles.append([*path[path.index(nxt) :], nxt])
                break
            path.append(nxt)
            seen.add(nxt)
    return cycles


def _component(module: str) -> tuple[int, str]:
    """(layer rank, component): rank 0 is the top layer."""
    best: tuple[int, str] | None = None
    for rank, (_, members) in enumerate(LAYERS):
        for member in members:
            if (module == member or module.startswith(member + ".")) and (
                best is None or len(member) > len(best[1])
            ):
                best = (rank, member)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    rank, component = best
    if component == "strato.__main__":
        component = "strato.cli"  # `python -m strato` is the command
    if component == "strato.backends" and module.count(".") >= 2:
        component = ".".join(module.split(".")[:3])  # each backend is its own component
    return rank, component


def forbidden(edge: Edge) -> str | None:
    """Why the edge breaks the layers (None: it does not)."""
    (src_rank, src), (dst_rank, dst) = _component(edge.source), _component(edge.target)
    if src == dst:
        return None
    if dst.startswith("strato.backends") and src_rank != 0:
        return f"only the entry points import backends; {src} may not"
    if src.startswith("strato.backends"):
        if dst in BACKEND_MAY_IMPORT:
            return None
        return f"a backend imports only {', '.join(BACKEND_MAY_IMPORT)}; not {dst}"
    if dst_rank == len(LAYERS) - 1:
        return None  # the foundation is there for everyone
    if dst_rank < src_rank:
        return f"{src} ({LAYERS[src_rank][0]}) may not import {dst} (above: {LAYERS[dst_rank][0]})"
    if dst_rank == src_rank:
        return f"{src} and {dst} are siblings in {LAYERS[src_rank][0]}: neither imports the other"
    return None


def impurities(source: str) -> list[str]:
    """What a pure module may not use: threads, clocks, environment, files, network."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
        for name in names:
            if name.split(".")[0] in IMPURE_MODULES:
                found.append(f"line {node.lineno}: imports {name}")
        if isinstance(node, ast.Name) and node.id in IMPURE_NAMES:
            found.append(f"line {node.lineno}: uses {node.id}")
        if isinstance(node, ast.Attribute) and node.attr in IMPURE_NAMES:
            found.append(f"line {node.lineno}: uses .{node.attr}")
    return found


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    return find_modules(SRC)


@pytest.fixture(scope="module")
def graph(modules: dict[str, Path]) -> dict[str, list[Edge]]:
    return build_graph(modules)


def test_there_are_no_import_cycles(graph: dict[str, list[Edge]]) -> None:
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" → ".join(c) for c in cycles)


def test_no_edge_breaks_the_layers(graph: dict[str, list[Edge]]) -> None:
    broken = {
        (e.source, e.target): f"{e}: {why}"
        for edges in graph.values()
        for e in edges
        if (why := forbidden(e)) is not None
    }
    new = [text for key, text in sorted(broken.items()) if key not in KNOWN_EDGES]
    fixed = [f"{a} → {b}" for a, b in KNOWN_EDGES if (a, b) not in broken]
    assert not new, "imports against the layers (module → imported module):\n" + "\n".join(new)
    assert not fixed, "fixed: remove from KNOWN_EDGES:\n" + "\n".join(fixed)


def test_the_pure_layers_use_no_threads_clocks_environment_or_io(
    modules: dict[str, Path],
) -> None:
    found = [
        f"{name}: {what}"
        for name, path in modules.items()
        if any(name == p or name.startswith(p + ".") for p in PURE)
        for what in impurities(path.read_text())
    ]
    assert not found, "impure code in strategy/ or control/:\n" + "\n".join(found)


def _subject(test_file: Path, packages: set[str]) -> str | None:
    """The one strato sub-package a test file imports (None: none, or several)."""
    subjects = set()
    for imported, _, _ in imports_of(test_file.read_text(), "tests", True):
        parts = imported.split(".")
        for depth in range(len(parts), 1, -1):
            name = ".".join(parts[:depth])
            if name in packages and not any(p.startswith(name + ".") for p in subjects):
                subjects = {s for s in subjects if not name.startswith(s + ".")} | {name}
                break
    return subjects.pop() if len(subjects) == 1 else None


def test_tests_mirror_the_packages(modules: dict[str, Path]) -> None:
    """A test directory mirrors a src package; a test file at the top of tests/ whose
    subject is one sub-package belongs in that sub-package's directory (a file whose
    subject is unclear, or the foundation's modules, stays where it is)."""
    packages = {name for name, path in modules.items() if path.name == "__init__.py"}
    packages.discard("strato")
    problems = []
    for test_file in sorted(TESTS.rglob("test_*.py")):
        rel = test_file.relative_to(TESTS)
        where = rel.parent.parts
        if where:
            if where[0] not in CROSS_CUTTING_TESTS and f"strato.{'.'.join(where)}" not in packages:
                problems.append(f"tests/{rel}: tests/{'/'.join(where)} mirrors no src package")
            continue
        subject = _subject(test_file, packages)
        if subject is not None and f"tests/{rel}" not in KNOWN_MISPLACED_TESTS:
            home = "/".join(subject.split(".")[1:])
            problems.append(f"tests/{rel} tests {subject}: move it to tests/{home}/")
    stale = [f for f in KNOWN_MISPLACED_TESTS if not (ROOT / f).exists()]
    assert not problems, "\n".join(problems)
    assert not stale, f"moved: remove from KNOWN_MISPLACED_TESTS: {stale}"


# ---- the checker itself fails on what it is there to catch --------------------------------


def _graph_of(tmp_path: Path, files: Mapping[str, str]) -> dict[str, list[Edge]]:
    for rel, text in files.items():
        path = tmp_path / "strato" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return build_graph(find_modules(tmp_path))


def test_the_checker_sees_lazy_relative_and_type_checking_imports(tmp_path: Path) -> None:
    graph = _graph_of(tmp_path, {
        "__init__.py": "",
        "errors.py": "",
        "fl/__init__.py": "",
        "fl/run.py": "def f():\n    from strato.backends.aws import fl\n",
        "backends/__init__.py": "",
        "backends/aws/__init__.py": "",
        "backends/aws/fl.py": "from typing import TYPE_CHECKING\n"
                              "from ...errors import X\n"
                              "if TYPE_CHECKING:\n    from strato.fl import run\n",
    })  # fmt: skip
    assert [(e.target, e.lazy) for e in graph["strato.fl.run"]] == [
        ("strato.backends.aws.fl", True)
    ]
    assert [e.target for e in graph["strato.backends.aws.fl"]] == ["strato.errors"]
    (edge,) = graph["strato.fl.run"]
    assert forbidden(edge) is not None
    assert not find_cycles(graph)  # the TYPE_CHECKING import closes no cycle


def test_the_checker_reports_cycles_and_backends_that_import_applications(
    tmp_path: Path,
) -> None:
    graph = _graph_of(tmp_path, {
        "__init__.py": "",
        "fl/__init__.py": "",
        "fl/run.py": "from strato.backends.aws import fl\n",
        "backends/__init__.py": "",
        "backends/aws/__init__.py": "",
        "backends/aws/fl.py": "from strato.fl import run\n",
    })  # fmt: skip
    assert find_cycles(graph) == [["strato.backends.aws.fl", "strato.fl.run",
                                   "strato.backends.aws.fl"]]  # fmt: skip
    assert all(forbidden(e) for edges in graph.values() for e in edges)
    assert impurities("import os\nx = os.environ['A']\n")
    assert impurities("from concurrent.futures import ThreadPoolExecutor\n")
    assert not impurities("import math\nimport numpy as np\n")
