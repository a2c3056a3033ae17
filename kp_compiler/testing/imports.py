"""The package's import graph, read from the source (no import runs): module edges, layer edges, cycles.

``python -m kp_compiler.testing.imports`` prints the layer edges (``passes -> core`` with a count) and any
module cycle; ``tests/test_import_direction.py`` asserts the direction the architecture promises.
Function-level imports count: they are edges all the same, only deferred.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent
NAME = PACKAGE.name


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    if node.level:
        base = current.split(".")
        base = base if is_package else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    # a name that is a submodule is an edge to it; any other name is a symbol of ``prefix``
    return [f"{prefix}.{a.name}" for a in node.names]


def edges() -> set[tuple[str, str]]:
    """(importer, imported) between the package's own modules."""
    known = modules()
    out = set()
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = _resolve(name, is_package, node)
            for t in targets:
                # the longest known module that the target names (a symbol import names its module)
                while t and t not in known:
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith(NAME):
                    out.add((name, t))
    return out


def layer(module: str) -> str:
    """``kp_compiler.passes.attention.match`` -> ``passes``; top-level modules are their own layer."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_edges(es=None) -> Counter:
    es = edges() if es is None else es
    return Counter((layer(a), layer(b)) for a, b in es if layer(a) != layer(b))


def cycles(es=None) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    es = edges() if es is None else es
    graph: dict[str, list[str]] = {}
    for a, b in es:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def main() -> int:
    es = edges()
    print(f"{len(modules())} modules, {len(es)} import edges between them")
    for (a, b), n in sorted(layer_edges(es).items()):
        print(f"  {a} -> {b}  ({n})")
    found = cycles(es)
    print(f"cycles: {len(found)}")
    for c in found:
        print("  " + " <-> ".join(c))
    return 0


if __name__ == "__main__":
    sys.exit(main())
