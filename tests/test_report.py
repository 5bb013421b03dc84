"""The end-of-run kNN report: the verdict against the fair floor, the run and the next commands."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from ssl_ema.eval.tables import knn_report, next_steps, verdict
from ssl_ema.reproduce.report import budget_text
from ssl_ema.reproduce.study import Study, StudyVariant

RESULT = {"knn_teacher": 0.9083, "knn_student": 0.9, "knn_random": 0.7417,
          "knn_random_bn": 0.8722, "step": 220}


def test_verdict_clears_the_floor_only_by_the_margin() -> None:
    assert verdict(RESULT).startswith("The teacher is 3.6 points above the fair floor")
    below = verdict({**RESULT, "knn_teacher": 0.8139})
    assert "-5.8 points from" in below and "not evidence" in below
    # 2.9 points is a gain, but within the margin: not called learning.
    assert "not evidence" in verdict({**RESULT, "knn_teacher": 0.9012})
    assert "No fair floor" in verdict({k: v for k, v in RESULT.items() if k != "knn_random_bn"})


def test_next_steps_name_the_run_and_cifar_only_after_digits() -> None:
    run = Path("/tmp/runs/quickstart/20261130-000000")
    lines = next_steps(run, "digits").splitlines()
    assert lines[0] == f"Run: {run}"
    assert f"python tools/eval.py {run} --protocol linear" in lines[2]
    assert f"python tools/export.py {run}" in lines[3]
    assert "recipes/byol_r18.yaml" in lines[4]
    assert "byol_r18" not in next_steps(run, "cifar10")


def test_report_is_table_then_verdict_then_next() -> None:
    cfg = SimpleNamespace(eval=SimpleNamespace(knn_k=20, knn_temperature=0.1),
                          data=SimpleNamespace(dataset="digits"))
    lines = knn_report(RESULT, cfg, 360, Path("runs/x")).splitlines()  # type: ignore[arg-type]
    assert lines[0] == "kNN top-1 (k=20, t=0.1) on 360 held-out digits images after 220 steps:"
    assert lines[2] == "  teacher (EMA of student)     0.9083"
    assert lines[5] == "  random init, BN recomputed   0.8722"
    assert lines[6].startswith("The teacher is 3.6 points above") and lines[7] == "Run: runs/x"


def test_the_quoted_budget_fits_the_runs_two_at_once() -> None:
    def study(device: str, minutes: float, seeds: tuple[int, ...]) -> Study:
        return Study(name="s", title="t", claim="c", paper="p", schedule="s", recipe="r.yaml",
                     variants=(StudyVariant("a"), StudyVariant("b")), seeds=seeds,
                     device=device, minutes_per_run=minutes)
    # 4 runs of 21.5 min, two at once: 43 min, with a fifth to spare 51.6 -> 55m
    assert budget_text(study("cpu", 21.5, (0, 1))) == "55m"
    assert budget_text(study("cpu", 6.0, (0, 1, 2, 3, 4))) == "40m"  # 10 runs: 30 min
    assert budget_text(study("cpu", 30.0, (0, 1, 2))) == "2h"  # 6 runs: 90 min, 108 with spare
    assert budget_text(study("gpu", 30.0, (0, 1))) == "9m"  # a lease's command
