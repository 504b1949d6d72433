"""The folder layout is the architecture: layers import only downwards, and no module imports itself
back through another (counting the imports inside functions, which hide cycles from Python but not
from a reader)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "custom_components"

# The layers from the bottom up: a layer may import the layers below it (and itself); the top-level
# package (__init__: the version) is importable from everywhere.
ORDER = ("physics", "io", "data", "methods", "bundle", "mapping", "reporting", "cli")
ALLOWED = {layer: set(ORDER[:i]) for i, layer in enumerate(ORDER)}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every custom_components module imported anywhere in ``path`` (module level or inside functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("custom_components"):
                continue
            for alias in node.names:  # "from . import anatomy" imports a module
                sub = f"{mod}.{alias.name}"
                out.add(sub if _exists(sub) else mod)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("custom_components"))
    return out


def _exists(mod: str) -> bool:
    p = PKG.parent / Path(*mod.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


GRAPH = {_module_name(p): _imports(p) for p in PKG.rglob("*.py")}


def _layer(mod: str) -> str | None:
    parts = mod.split(".")
    if len(parts) == 1:
        return None  # the package itself (__version__)
    return "cli" if parts[1] == "cli" else parts[1]


def test_every_module_sits_in_a_layer():
    flat = sorted(m for m in GRAPH if m.count(".") == 1 and m.split(".")[1] not in ALLOWED)
    assert not flat, f"modules outside the layer folders: {flat}"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_layers_import_only_downwards(module):
    own = _layer(module)
    if own is None:
        return
    bad = sorted(m for m in GRAPH[module] if _layer(m) not in (None, own) and _layer(m) not in ALLOWED[own])
    assert not bad, f"{module} ({own}) imports {bad}"


def test_no_import_cycles():
    """Depth-first search for a cycle among the modules (a package's __init__ counts as the package)."""
    def deps(m):
        out = set()
        for d in GRAPH.get(m, ()):
            # importing a package's submodule runs the package's __init__ too
            parts = d.split(".")
            for i in range(2, len(parts) + 1):
                pre = ".".join(parts[:i])
                if pre in GRAPH and pre != m and not m.startswith(pre + "."):
                    out.add(pre)
        return out

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in deps(m):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
