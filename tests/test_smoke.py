"""tools/smoke.py on the CPU at tiny sizes: every check runs and passes, one JSON line each as
it ends, and a killed run keeps the lines of the checks that finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssl_ema.reproduce.smoke import CHECKS
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # trains every method a few steps through the real trainer
SMOKE = str(ROOT / "tools" / "smoke.py")


def lines(path: Path) -> list[dict]:
    """The complete lines of the smoke check's output (a kill may cut the last one short)."""
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.split("\n")[:-1]]


def test_every_check_runs_on_a_cpu(tmp_path: Path, tools_env: dict[str, str]) -> None:
    out, results = tmp_path / "smoke.jsonl", tmp_path / "results"
    cpu_only = {**tools_env, "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, on a GPU machine too
    proc = subprocess.run([sys.executable, SMOKE, "--out", str(out), "--work",
                           str(tmp_path / "work"), "--results", str(results), "--budget", "3000"],
                          env=cpu_only, capture_output=True, text=True, timeout=3600)
    got = lines(out)
    assert [g["check"] for g in got] == list(CHECKS), proc.stderr[-3000:]
    assert all(g["ok"] for g in got), [g for g in got if not g["ok"]]
    assert proc.returncode == 0
    by = {g["check"]: g for g in got}
    assert by["byol_lightly"]["images_per_s"] > 0 and by["byol_lightly"]["device"] == "cpu"
    assert by["fused_ema"]["resumed_equal"] and by["fused_ema"]["equal_to_unfused"]
    # libjpeg-turbo reads every kind; nothing fell back
    assert set(by["jpeg"]["alone"].values()) == {"ok"} and by["jpeg"]["decode_fallbacks"] == 0
    assert by["views"]["ulp"]["strong"][0] >= 0.0 and "tf32" in by["views"]
    assert not (results / "devices.json").exists()  # a CPU's tiny run is no device speed


def test_a_killed_smoke_check_keeps_the_finished_lines(tmp_path: Path,
                                                       tools_env: dict[str, str]) -> None:
    out = tmp_path / "smoke.jsonl"
    cmd = [sys.executable, SMOKE, "--out", str(out), "--work", str(tmp_path / "work"),
           "--check", "moco", "--check", "supervised"]
    proc = subprocess.Popen(cmd, env=tools_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    start = time.monotonic()
    while not lines(out) and proc.poll() is None:
        assert time.monotonic() - start < 900
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    got = lines(out)
    assert got[0]["check"] == "moco" and got[0]["ok"] and got[0]["seconds"] > 0


def test_a_work_folder_that_cannot_be_written_is_one_line(tmp_path: Path,
                                                          tools_env: dict[str, str]) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    proc = subprocess.run([sys.executable, SMOKE, "--work", str(blocker / "work"), "--check",
                           "moco"], env=tools_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"smoke: cannot write the synthetic data under {blocker / 'work'}: Not a directory; "
        "pass a writable --work"]
