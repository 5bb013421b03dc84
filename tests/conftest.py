from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

if "PYTEST_XDIST_WORKER" in os.environ:
    # Under pytest-xdist (pyproject: one worker per core) each worker and the tools it starts
    # get one thread: two workers at two threads each on two cores wait for each other's
    # cores, which made tiny steps several times slower (docs/RESULTS.md, "Test suite").
    os.environ["SSL_EMA_CPU_THREADS"] = os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

# What the tests share (paths, the tiny run, image folders) is tests/helpers.py; fixtures here.
from tests.helpers import ROOT, TINY  # noqa: E402  (after the thread settings above)


@pytest.fixture
def tools_env() -> dict[str, str]:
    """Environment for running tools/*.py in a subprocess from any working directory."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tools' run (test_eval_tools.py, test_finetune.py): a 3-step BYOL run on digits
    (ResNet-10-T, 8 px), evaluated on all 1,437/360 images."""
    from ssl_ema.config import load_config
    from ssl_ema.engine.trainer import Trainer

    out = tmp_path_factory.mktemp("run")
    cfg = load_config(None, [*TINY, "model.backbone=resnet10t", "model.cifar_stem=false",
                             "data.eval_subset=0", f"run.output_dir={out}"])
    Trainer(cfg, out / "run").fit()
    return out / "run"


# pytest-xdist hands out single tests (pyproject: --dist loadgroup), which balances the two
# workers better than whole files did; a module whose tests share a module-scoped fixture (one
# that trains or builds something once) keeps all its tests on one worker, so that fixture still
# runs once. Found from the fixtures each test uses, not from a list of modules.
def uses_module_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)  # pytest's fixture closure of the test
    if info is None:
        return False
    return any(d.scope == "module" for defs in info.name2fixturedefs.values() for d in defs)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if uses_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
