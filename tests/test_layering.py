"""The package's layering, read from the source: every import statement counts, at module
level or inside a function (a lazy import that dodges a circle is still the circle).

- the framework-free cores (compression, secagg, privacy) import neither Flower nor torch
  (documented exceptions: ``fedsqueeze/privacy/local.py``, the Opacus DP-SGD helper, and
  Opacus's accountants in ``fedsqueeze/privacy/accounting.py``);
- the shared contracts import neither torch nor the client or server side;
- no ``fedsqueeze.server`` module imports ``fedsqueeze.client``, nor the reverse;
- no import cycles between modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fedsqueeze"
CORES = ("fedsqueeze.compression", "fedsqueeze.secagg", "fedsqueeze.privacy")
CORE_EXCEPTIONS = {"fedsqueeze.privacy.local"}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


MODULES = _modules()


def _imports(name: str) -> tuple[set[str], set[str]]:
    """(fedsqueeze modules, top-level external packages) that module ``name`` imports."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    internal, external = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            if target.split(".")[0] != "fedsqueeze":
                external.add(target.split(".")[0])
                continue
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                internal.add(target)
    return internal, external


GRAPH = {name: _imports(name) for name in MODULES}


def _in(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_package_has_its_layers() -> None:
    for layer in ("fedsqueeze.contracts", "fedsqueeze.client", "fedsqueeze.server", *CORES):
        assert layer in MODULES


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _in(n, CORES)))
def test_cores_import_neither_flower_nor_torch(name: str) -> None:
    if name in CORE_EXCEPTIONS:
        pytest.skip("documented exception")
    internal, external = GRAPH[name]
    assert not external & {"flwr", "torch"}, f"{name} imports {external}"
    if "opacus" in external:  # documented: accounting uses Opacus's accountants
        assert name == "fedsqueeze.privacy.accounting"
    assert not {m for m in internal if _in(m, ("fedsqueeze.client", "fedsqueeze.server"))}


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _in(n, ("fedsqueeze.contracts",))))
def test_contracts_sit_below_both_sides(name: str) -> None:
    internal, external = GRAPH[name]
    assert "torch" not in external
    assert not {m for m in internal if _in(m, ("fedsqueeze.client", "fedsqueeze.server"))}


def crossings(graph: dict[str, tuple[set[str], set[str]]]) -> list[tuple[str, str]]:
    """Imports from one side (client, server) into the other."""
    sides = (("fedsqueeze.server",), ("fedsqueeze.client",))
    return [
        (a, b)
        for a, (internal, _) in graph.items()
        for b in internal
        if (_in(a, sides[0]) and _in(b, sides[1])) or (_in(a, sides[1]) and _in(b, sides[0]))
    ]


def find_cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import cycle (``[a, b, ..., a]``), or ``[]``."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return []

    for start in sorted(edges):
        if start not in state and (found := visit(start, [start])):
            return found
    return []


def test_neither_side_imports_the_other() -> None:
    assert crossings(GRAPH) == []


def test_no_import_cycles() -> None:
    # A package's __init__ importing its own children is a re-export, not a cycle.
    edges = {
        a: {b for b in internal if not (MODULES[a].name == "__init__.py" and b.startswith(a + "."))}
        for a, (internal, _) in GRAPH.items()
    }
    assert find_cycle(edges) == []


def test_the_checks_see_planted_violations() -> None:
    planted = dict(GRAPH)
    server, client = "fedsqueeze.server.app", "fedsqueeze.client.app"
    planted[server] = (GRAPH[server][0] | {client}, set())
    assert crossings(planted) == [(server, client)]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
