"""The import graph of megatron_internvl/data/quality: no cycles (imports inside functions count),
and nothing imported from megatron_internvl above the data layer."""

from __future__ import annotations

import ast
import os

import megatron_internvl.data.quality as quality

PACKAGE = "megatron_internvl.data.quality"
ALLOWED = ("megatron_internvl.config", "megatron_internvl.data")


def imports_of(path: str, module: str) -> set[str]:
    """Every module `module` imports, at any depth of its code, as absolute names."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            out.add(target)
            # `from . import review` imports the submodule review
            out.update(f"{target}.{a.name}" for a in node.names)
    return out


def package_graph() -> dict[str, set[str]]:
    folder = os.path.dirname(quality.__file__)
    modules = {f"{PACKAGE}.{name[:-3]}": os.path.join(folder, name)
               for name in os.listdir(folder) if name.endswith(".py") and name != "__init__.py"}
    return {m: imports_of(p, m) for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v] & graph.keys():
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
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_in_the_quality_package(tmp_path):
    graph = package_graph()
    assert f"{PACKAGE}.manifest" in graph and f"{PACKAGE}.pipeline" in graph
    assert cycles(graph) == []
    # the checker sees a cycle closed by an import inside a function (the former pipeline <-> review)
    (tmp_path / "pipeline.py").write_text("from . import review\n")
    (tmp_path / "review.py").write_text("def apply():\n    from .pipeline import MANIFEST\n")
    pkg = "pkg.quality"
    toy = {f"{pkg}.{n}": imports_of(str(tmp_path / f"{n}.py"), f"{pkg}.{n}") for n in ("pipeline", "review")}
    assert cycles(toy) == [[f"{pkg}.pipeline", f"{pkg}.review"]]


def test_quality_imports_nothing_above_the_data_layer():
    for module, imported in package_graph().items():
        ours = {m for m in imported if m == "megatron_internvl" or m.startswith("megatron_internvl.")}
        outside = sorted(m for m in ours if not m.startswith(ALLOWED))
        assert outside == [], f"{module} imports {outside}"
