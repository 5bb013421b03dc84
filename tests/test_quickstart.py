"""The CPU recipes end to end via the documented command: they must beat the fair floor, random
weights with recomputed BatchNorm statistics (the quick start's teacher and student, DINO's
student in a shortened run)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, python

pytestmark = pytest.mark.slow  # trains, or runs the tools, through the real trainer


def launch(recipe: str, tmp_path: Path, env: dict[str, str], *overrides: str) -> dict[str, Any]:
    cmd = [python(), str(ROOT / "tools" / "train.py"), str(ROOT / "recipes" / recipe),
           f"run.output_dir={tmp_path}", *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "teacher (EMA of student)" in proc.stdout and "random init backbone" in proc.stdout
    assert "random init, BN recomputed" in proc.stdout
    # What the table shows against the fair floor, where the run is, what to run next.
    assert "BatchNorm statistics" in proc.stdout and f"Run: {tmp_path}" in proc.stdout
    assert "tools/export.py" in proc.stdout
    (results,) = tmp_path.glob("*/*/results.json")
    return json.loads(results.read_text())


def test_quickstart_teacher_beats_the_fair_floor(
    tmp_path: Path, tools_env: dict[str, str]
) -> None:
    r = launch("quickstart.yaml", tmp_path, tools_env)
    assert r["step"] == 330 and r["samples_seen"] == 30 * 11 * 128
    # The fair floor: the same random weights with BatchNorm statistics recomputed on the
    # training images, scored with the same kNN (k = 20). The teacher and the student must clear
    # it by 3 points (docs/RESULTS.md, seed 0: 0.872 / 0.886 at one thread, as under xdist;
    # 0.858 / 0.872 at two; against 0.803).
    assert r["knn_teacher"] > r["knn_random_bn"] + 0.03
    assert r["knn_student"] > r["knn_random_bn"] + 0.03
    assert r["knn_random_bn"] > r["knn_random"] + 0.05  # normalising alone is worth this much


def test_dino_digits_student_beats_the_fair_floor(
    tmp_path: Path, tools_env: dict[str, str]
) -> None:
    # 8 of the recipe's 30 epochs (docs/RESULTS.md, seed 0, one thread, k = 20): student 0.894
    # and teacher 0.819 against the floor's 0.803 and the random backbone's 0.731. In 88 steps the
    # teacher (momentum 0.996 -> 1, a horizon of ~250 steps) still lags; the full recipe's
    # teacher clears the floor by 9.4 points.
    r = launch("dino_digits.yaml", tmp_path, tools_env, "train.epochs=8", "eval.every_epochs=0")
    assert r["step"] == 8 * 11
    assert r["knn_student"] > r["knn_random_bn"] + 0.03
    assert r["knn_teacher"] > r["knn_random"] + 0.05
