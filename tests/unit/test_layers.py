"""The engine's layers: every import points down (or sideways), and none goes round.

Read from the source with ``ast`` (every ``import`` in a module counts, also
one inside a function: a lazy import is still a dependency), so a future
upward import fails here rather than as a circular-import error at run time.
Each top-level module or package of engine/ sits in one layer; a module may
import its own layer and the layers below.  Then, module by module, the
import graph must have no cycle at all.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[2] / "engine"

#: lowest first; a unit is engine/<unit>.py or the package engine/<unit>/
LAYERS: list[set[str]] = [
    {"errors", "trace", "ctlerrors", "uffd"},  # the hierarchy, trace points, OS wrappers
    {"state", "options", "procs"},            # status table, caps/params, processes
    {"stream", "stats", "transport", "ram"},  # wire codecs, figures, channels, memory
    {"devices", "telemetry", "postcopy", "compress"},
    {"machine", "plot", "multifd"},
    {"migration"},                            # the drivers
    {"qmp", "library"},                       # front ends over the drivers
    {"stress"},
    {"commands"},                             # the subcommands
    {"cli"},                                  # the parser that dispatches to them
    {"__main__"},
]

#: Imports that break the order today, each with its owner's plan.  An entry
#: that no longer occurs fails the test too, so the list only shrinks.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ENGINE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ENGINE.rglob("*.py"))}


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The engine modules ``name`` imports (``from engine import trace``
    counts as engine.trace; a relative import is resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from pkg import mod`` depends on pkg.mod; ``from pkg import
            # name`` on pkg (its __init__) itself.
            subs = [f"{mod}.{a.name}" for a in node.names]
            targets = [t for t in subs if t in MODULES]
            if len(targets) < len(subs):
                targets.append(mod)
        else:
            continue
        out.update(t for t in targets if t in MODULES and t != name)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _layer_of() -> dict[str, int]:
    out = {}
    for i, units in enumerate(LAYERS):
        for u in units:
            assert u not in out, f"{u} is in two layers"
            out[u] = i
    return out


LAYER = _layer_of()


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in MODULES} - {None}
    missing = sorted(units - set(LAYER))
    assert not missing, f"add these to LAYERS in {__file__}: {missing}"
    stale = sorted(set(LAYER) - units)
    assert not stale, f"no such module or package in engine/: {stale}"


def test_no_upward_import():
    upward = set()
    for src, targets in GRAPH.items():
        s = _unit(src)
        for dst in targets:
            d = _unit(dst)
            if s is None or d is None:
                continue
            if LAYER[d] > LAYER[s]:
                upward.add((src, dst))
    new = sorted(upward - KNOWN_UPWARD)
    assert not new, "upward imports (a module may import its own layer or lower):\n" + \
        "\n".join(f"  {a} -> {b} ({_unit(b)} is above {_unit(a)})" for a, b in new)
    gone = sorted(KNOWN_UPWARD - upward)
    assert not gone, f"fixed, remove from KNOWN_UPWARD: {gone}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []

    def visit(v: str) -> None:
        # Iterative, so a long chain cannot hit the recursion limit.
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _graph_without_known() -> dict[str, set[str]]:
    return {src: {d for d in targets if (src, d) not in KNOWN_UPWARD}
            for src, targets in GRAPH.items()}


def test_no_import_cycle():
    cycles = _cycles(_graph_without_known())
    assert not cycles, "import cycles:\n" + "\n".join(f"  {' <-> '.join(c)}" for c in cycles)


def test_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_upward_import_is_caught(tmp_path):
    """The checker sees a lazy import inside a function, and resolves
    relative and ``from engine import x`` imports."""
    src = tmp_path / "mod.py"
    src.write_text("def f():\n    from engine.cli import main\n"
                   "from engine import trace\nfrom . import constants\n")
    global MODULES
    name = "engine.stream.mod"
    saved = MODULES
    MODULES = {**saved, name: src}
    try:
        found = _imports(name, src)
    finally:
        MODULES = saved
    assert found == {"engine.cli", "engine.trace", "engine.stream.constants"}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    """Each module imports (the ast checks above read files that must be the
    ones Python loads)."""
    importlib.import_module(name)


def test_exception_classes_live_in_errors_py():
    import inspect
    found = set()
    for name in MODULES:
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, BaseException) \
                    and obj.__module__ == name and name != "engine.errors":
                found.add(f"{name}.{obj.__qualname__}")
    new = sorted(found)
    assert not new, f"define these in engine/errors.py: {new}"
