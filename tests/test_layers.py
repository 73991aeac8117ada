"""The package's layering, checked from the source: every import (inside functions too) goes to
the same layer or one below, and no files import each other in a circle.

The layer order is written here and in docs/architecture.md; change both together.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "megatron_internvl"

# Lowest first. A module may import from its own layer and the ones below it.
LAYERS = [
    ("megatron_internvl", "config", "kernels"),  # the package root holds only warning filters
    ("models", "parallel"),
    ("data",),
    ("checkpoint",),
    ("convert",),
    ("training",),
    ("planning", "launch"),
    ("cli", "train"),
]
# Sub-packages that are tools over their layer: nothing else in that layer may import them.
TOOLS = {"megatron_internvl.data.quality": "megatron_internvl.data"}


def source_files() -> dict[str, Path]:
    """Module name -> file, for the package and for kernels/ (installed as megatron_internvl.kernels)."""
    found = {}
    for base, prefix in ((ROOT / PACKAGE, PACKAGE), (ROOT / "kernels", PACKAGE + ".kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """The package modules ``name`` imports, with line numbers: every Import / ImportFrom node,
    module level or not. ``from pkg import sub`` counts as importing the submodule."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target
                       for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in modules and t != name and (t, node.lineno) not in out:
                out.append((t, node.lineno))
    return out


def layer_of(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else parts[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS in "
                         f"tests/test_layers.py and to docs/architecture.md")


def graph():
    modules = source_files()
    return modules, {m: imports_of(m, p, modules) for m, p in modules.items()}


def test_every_module_has_a_layer():
    modules, _ = graph()
    assert len(modules) > 50  # the walk found the package
    for m in modules:
        layer_of(m)


def test_no_import_goes_up_a_layer():
    modules, edges = graph()
    bad = []
    for m, targets in edges.items():
        for t, line in targets:
            if layer_of(t) > layer_of(m):
                bad.append(f"{modules[m].relative_to(ROOT)}:{line}: {m} (layer {layer_of(m)}) imports "
                           f"{t} (layer {layer_of(t)})")
            for tool, layer_pkg in TOOLS.items():
                inside = lambda x: x == tool or x.startswith(tool + ".")  # noqa: E731
                if inside(t) and not inside(m) and m.startswith(layer_pkg):
                    bad.append(f"{modules[m].relative_to(ROOT)}:{line}: {m} imports the tool {t}")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def cycles(edges: dict[str, list]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    succ = {m: sorted({t for t, _ in ts}) for m, ts in edges.items()}
    for start in sorted(succ):
        if start in index:
            continue
        work = [(start, iter(succ[start]))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(succ.get(nxt, []))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles():
    modules, edges = graph()
    found = cycles(edges)
    detail = []
    for comp in found:
        members = set(comp)
        detail.append(" <-> ".join(comp) + ": " + "; ".join(
            f"{m} imports {t} (line {line})" for m in comp for t, line in edges[m] if t in members))
    assert not found, "files importing each other in a circle:\n" + "\n".join(detail)


def test_the_checker_sees_function_level_imports_and_cycles(tmp_path):
    """The walk would be worthless if it missed imports inside functions or real cycles."""
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "b.py").write_text("from p import a\n")
    mods = {"p": pkg / "__init__.py", "p.a": pkg / "a.py", "p.b": pkg / "b.py"}
    edges = {m: imports_of(m, path, mods) for m, path in mods.items()}
    assert edges["p.a"] == [("p.b", 2)] and edges["p.b"] == [("p.a", 1)]
    assert cycles(edges) == [["p.a", "p.b"]]
