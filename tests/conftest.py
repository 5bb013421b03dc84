from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")

if "PYTEST_XDIST_WORKER" in os.environ:
    # Under pytest-xdist (pyproject: one worker per core) each worker and the tools it starts
    # get one thread: two workers at two threads each on two cores wait for each other's
    # cores, which made tiny steps several times slower (docs/RESULTS.md, "Test suite").
    os.environ["SSL_EMA_CPU_THREADS"] = os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def tools_env() -> dict[str, str]:
    """Environment for running tools/*.py in a subprocess from any working directory."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def python() -> str:
    return sys.executable


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` as a module (registered, so its dataclasses find their module)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# pytest-xdist hands out single tests (pyproject: --dist loadgroup), which balances the two
# workers better than whole files did; a module whose module-scoped fixture trains or builds
# something once keeps all its tests on one worker, so that fixture still runs once.
SHARED_FIXTURE_MODULES = {"test_bench_ema", "test_device_classify", "test_device_pipeline",
                          "test_eval_tools", "test_finetune", "test_noisy_quadratic",
                          "test_own_classifier"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem in SHARED_FIXTURE_MODULES:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
