"""The method registry: everything that lists methods derives from it, so a new method file gets
these generic checks for free; and the package has no import cycles."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from ssl_ema.config import CHOICES, CLASSIFICATION_METHODS, ConfigError, load_config
from ssl_ema.data.datasets import build_data
from ssl_ema.methods import METHODS, TeacherStudentMethod, build_method

# Tiny models on 8 px digits: the generic checks build every method in a second or two.
TINY = ["data.image_size=8", "model.backbone=test_resnet", "model.cifar_stem=false",
        "method.projection_hidden_dim=16", "method.projection_dim=8",
        "method.prediction_hidden_dim=16", "train.batch_size=4", "labels.per_class=8",
        "pseudo_label.mu=2"]


def test_choices_and_checks_derive_from_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    assert CHOICES["method.name"] == tuple(METHODS)
    assert set(CLASSIFICATION_METHODS) == {n for n, s in METHODS.items() if s.labels != "none"}
    device = [n for n, s in METHODS.items() if s.device_views is not None or s.device_classify]
    assert {"byol", "dino", "moco", "supervised", "pseudo_label"} <= set(device)
    load_config(None, ["data.dataset=cifar10", "data.pipeline=device", "method.name=supervised"])
    # A method registered without device views is refused on the device pipeline.
    monkeypatch.setitem(METHODS, "supervised",
                        dataclasses.replace(METHODS["supervised"], device_classify=False))
    others = ", ".join(n for n in device if n != "supervised")
    with pytest.raises(ConfigError, match=f"makes the views of {others}; "
                                          "method.name=supervised uses data.pipeline=loader"):
        load_config(None, ["data.dataset=cifar10", "data.pipeline=device",
                           "method.name=supervised"])


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_on_its_own_batches(name: str) -> None:
    """The batch contract (ssl_ema/data/batch.py): the registered views of each method, collated
    by the loader, go through the method's forward to a finite loss with a graph."""
    spec = METHODS[name]
    labels = [] if spec.labels != "none" else ["labels.per_class=0"]
    cfg = load_config(None, [*TINY, *labels, f"method.name={name}", *spec.tiny_overrides])
    data = build_data(cfg)
    method = build_method(cfg, data.in_chans, data.num_classes)
    batch = next(iter(DataLoader(data.train, batch_size=4)))
    out = method(batch)
    assert out["loss"].requires_grad and torch.isfinite(out["loss"])
    assert set(method.teacher) <= set(method.student)
    assert method.evaluation == spec.evaluation in ("knn", "classify")
    # One momentum schedule, in the base class: no method redefines it.
    assert "momentum" not in vars(type(method)) and isinstance(method, TeacherStudentMethod)
    assert method.momentum(0.5) == pytest.approx(0.5 * (cfg.method.momentum + 1.0))


def test_byol_with_a_vit_honours_patch_size() -> None:
    cfg = load_config(None, ["method.name=byol", "model.backbone=test_vit",
                             "model.cifar_stem=false", "model.patch_size=4",
                             "data.image_size=16"])
    method = build_method(cfg, in_chans=1)
    for role in (method.student, method.teacher):
        assert role["backbone"].patch_embed.patch_size == (4, 4)
    x = torch.randn(2, 1, 16, 16)
    assert role["backbone"].forward_features(x).shape[1] == 16 + 1  # (16/4)^2 patches + class


def _imports(path: Path, module: str) -> set[str]:
    """Every ssl_ema module ``path`` imports, deferred ones included, plus the packages whose
    ``__init__`` an import runs (but not the module's own, which run first)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
    # A module's own packages are always initialised before it: no dependency.
    own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    return {m for m in found if m.startswith("ssl_ema.")} - own


def test_no_import_cycles() -> None:
    root = Path(__file__).parents[1] / "ssl_ema"
    modules = {}
    for path in root.rglob("*.py"):
        name = ".".join(("ssl_ema", *path.relative_to(root).with_suffix("").parts))
        modules[name.removesuffix(".__init__")] = path
    graph = {m: _imports(p, m) & set(modules) - {m} for m, p in modules.items()}
    # ssl_ema/methods/__init__.py imports every module of its package (discovery).
    graph["ssl_ema.methods"] |= {m for m in modules if m.startswith("ssl_ema.methods.")}
    cycles = _strongly_connected(graph)
    # engine <-> eval and eval.classify <-> eval.classify_report are issue 17's other half.
    left = [c for c in cycles if not all(m.startswith(("ssl_ema.engine", "ssl_ema.eval"))
                                         for m in c)]
    assert left == []


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return out
