"""The dependency rule of docs/architecture.md, read from the imports of every module:

- `gateway` imports only the engines' registry (`engines`), contract (`engines.base`),
  errors (`engines.errors`) and schema (`engines.spec`); its CLI may also start the
  simulator, the load generator and the pipeline;
- `engines` never imports `gateway` (only `engines.sim` may start the simulator);
- `simulator`, `loadgen` and `pipeline` import nothing of `gateway`, and `pipeline` only
  the engines' model references (`engines.model_source`);
- no import circle among the product's modules, counting every import: at the top, inside
  functions and under `TYPE_CHECKING` (a lazy or typing-only import still ties two
  modules' designs together; a protocol in the imported-from module breaks such a tie).

Imports inside functions count for every rule: a lazy import crosses a boundary as much
as a top-level one."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "engines", "simulator", "loadgen", "pipeline")

ALLOWED: dict[str, set[str]] = {
    "gateway": {"engines", "engines.base", "engines.errors", "engines.spec"},
    "engines": set(),
    "simulator": set(),
    "loadgen": set(),
    "pipeline": {"engines.model_source"},
}
# Named exceptions: the module, and what it may import beyond its package's rule.
EXCEPTIONS: dict[str, set[str]] = {
    "gateway.cli": {"simulator.__main__", "loadgen.cli", "pipeline", "pipeline.cli"},
    "engines.sim": {"simulator.config", "simulator.server"},
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> Iterator[str]:
    """Absolute module names `path` imports anywhere in it (`from a import b` yields `a`
    and `a.b`)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def _modules() -> dict[str, Path]:
    return {_module(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def test_each_package_imports_only_what_the_rule_allows() -> None:
    modules = _modules()
    broken: list[str] = []
    for name, path in modules.items():
        pkg = name.split(".")[0]
        allowed = ALLOWED[pkg] | EXCEPTIONS.get(name, set())
        for imported in set(_imports(path)):
            top = imported.split(".")[0]
            if top not in PACKAGES or top == pkg:
                continue
            if imported not in modules and imported.rpartition(".")[0] in modules:
                imported = imported.rpartition(".")[0]  # `from a import name`: the module a
            if imported not in modules:
                continue
            if imported not in allowed:
                broken.append(f"{name} imports {imported}")
    assert not broken, "the dependency rule is broken:\n" + "\n".join(sorted(broken))


def test_the_rule_is_checked_against_real_imports() -> None:
    """The reader sees imports where they are: a lazy one inside a function too."""
    gateway_imports = set(_imports(ROOT / "gateway" / "cli.py"))
    assert "loadgen.cli" in gateway_imports and "engines" in gateway_imports
    assert "engines.base" in set(_imports(ROOT / "gateway" / "api" / "admit.py"))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle() -> None:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for imported in _imports(path):
            if imported in modules and imported != name:
                edges.add(imported)
            elif imported.rpartition(".")[0] in modules and imported.rpartition(".")[0] != name:
                edges.add(imported.rpartition(".")[0])
        # A package's __init__ runs before its submodules: importing a.b imports a first,
        # but that is the language's order, not a circle of ours.
        graph[name] = {e for e in edges if not name.startswith(e + ".")}
    assert _cycles(graph) == []
