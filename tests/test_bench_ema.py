"""tools/bench_ema.py on a tiny model: correctness gate, limit formula, CLI errors (a few s)."""

from __future__ import annotations

import importlib.util
import subprocess
from collections.abc import Sequence
from types import ModuleType

import pytest
import torch
from torch import nn

from tests.helpers import ROOT, python

BENCH = ROOT / "tools" / "bench_ema.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_ema", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def test_limit_formula(bench: ModuleType) -> None:
    p = 11_689_512
    assert bench.limit_bytes(p, 1) == 3 * p * 4
    assert bench.limit_bytes(p, 5) == 11 * p * 4


@pytest.mark.slow
def test_bench_model_tiny(bench: ModuleType) -> None:
    model = tiny()
    num_params = sum(p.numel() for p in model.parameters())
    res = bench.bench_model("tiny", model, torch.device("cpu"), bandwidth=1e10, repeats=2,
                            warmup=1)
    assert res["params"] == num_params and res["check_max_abs_diff"] <= 1e-6
    rows = res["rows"]
    assert {r["k"] for r in rows} == {1, 5}
    assert len(rows) == 2 * len(bench.IMPLEMENTATIONS)
    k1 = next(r for r in rows if r["k"] == 1)
    assert k1["limit_ms"] == pytest.approx(3 * num_params * 4 / 1e10 * 1e3)
    timed = [r for r in rows if r["ms"] is not None]
    assert {r["implementation"] for r in timed} >= {"ssl_ema.EMA", "lightly.update_momentum",
                                                    "timm ModelEmaV3", "torch AveragedModel (ema)"}
    assert all(r["ms"] > 0 and r["x_limit"] == pytest.approx(r["ms"] / r["limit_ms"])
               for r in timed)


def test_check_rejects_a_wrong_update(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    class WrongMomentum(bench.EMA):  # type: ignore[name-defined]
        def update(self, momenta: Sequence[float]) -> None:
            super().update([m - 0.01 for m in momenta])

    monkeypatch.setattr(bench, "EMA", WrongMomentum)
    init = tiny()
    with pytest.raises(bench.CheckError, match="disagrees"):
        bench.check_against_lightly(init, bench.perturbed(init), bench.MOMENTA)


def _run(args: list[str], env: dict[str, str], cwd: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([python(), str(BENCH), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.slow
def test_cli_unknown_model_exits_2_one_line(tools_env: dict[str, str], tmp_path: object) -> None:
    proc = _run(["--models", "resnet9000", "--device", "cpu"], tools_env, tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "resnet9000" in lines[0] and all(m in lines[0] for m in
                                            ("resnet18", "resnet50", "vit_base_patch16_224"))


def test_cuda_without_cuda_exits_2(bench: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", "cuda"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "CUDA is not available" in err
