"""No import cycles in ssl_ema: the graph of every import statement, deferred ones (inside a
function) and ``TYPE_CHECKING`` ones included, read from the source without importing it."""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import ROOT

PACKAGE = ROOT / "ssl_ema"


def module_of(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the ssl_ema modules its source imports. ``from pkg import name`` is an edge to
    ``pkg.name`` when that is a module, else to ``pkg`` (its ``__init__``)."""
    modules = {module_of(p, package.parent): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, set())
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, up level - 1 packages
                    anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                    base = ".".join([*anchor, *([base] if base else [])])
                for a in node.names:
                    target = f"{base}.{a.name}"
                    edges.add(target if target in modules else base)
        edges.discard(name)
        edges.intersection_update(modules)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_sees_deferred_and_relative_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "ssl_ema"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "sub" / "__init__.py").write_text("from ssl_ema.sub.a import f\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\n"
                                      "if TYPE_CHECKING:\n    from ssl_ema.sub import a\n")
    (pkg / "c.py").write_text("import ssl_ema.sub.b\n")
    graph = import_graph(pkg)
    assert graph == {"ssl_ema.sub": {"ssl_ema.sub.a"}, "ssl_ema.sub.a": {"ssl_ema.sub.b"},
                     "ssl_ema.sub.b": {"ssl_ema.sub.a"}, "ssl_ema.c": {"ssl_ema.sub.b"}}
    assert cycles(graph) == [["ssl_ema.sub.a", "ssl_ema.sub.b"]]


def test_engine_and_eval_have_no_cycles() -> None:
    """The evaluations get an `EvalContext`, not the Trainer; the tables need no evaluation."""
    bad = [c for c in cycles(import_graph())
           if any(m.startswith(("ssl_ema.engine", "ssl_ema.eval")) for m in c)]
    assert bad == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_eval_imports_nothing_from_the_engine() -> None:
    """Finished runs are read through `ssl_ema.run_files`, below both."""
    graph = import_graph()
    up = {(m, t) for m, targets in graph.items() if m.startswith("ssl_ema.eval")
          for t in targets if t.startswith("ssl_ema.engine")}
    assert up == set()


def test_data_imports_nothing_from_methods() -> None:
    """The engine looks the method up and hands the data code its views (`MethodData`)."""
    graph = import_graph()
    up = {(m, t) for m, targets in graph.items() if m.startswith("ssl_ema.data")
          for t in targets if t.startswith("ssl_ema.methods")}
    assert up == set()


def test_reading_a_recipe_loads_no_torch(tmp_path: Path) -> None:
    """`ssl_ema.config` and the method registry are torch-free, so a recipe's typo is one line
    from tools/train.py in well under a second (torch, timm and lightly take seconds)."""
    code = ("import sys, ssl_ema.config, ssl_ema.methods; "
            "print(sorted(m for m in ('torch', 'timm', 'lightly', 'ssl_ema.methods.dino') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("method:\n  name: byol\ntrain:\n  epochz: 3\n")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), str(recipe)],
                          cwd=tmp_path, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "unknown key 'train.epochz'" in done.stderr
    assert elapsed < 5.0  # about 0.2 s of CPU; the bound leaves room for a loaded machine
