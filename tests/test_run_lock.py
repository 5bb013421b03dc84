"""One writer per run directory: a lock naming its holder, refused twice, taken over when stale."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
from accelerate import Accelerator

from ssl_ema.config import ConfigError, dump_yaml, load_config
from ssl_ema.engine.checkpoint import save_checkpoint
from ssl_ema.engine.launch import train
from ssl_ema.engine.lock import RunLock

pytestmark = pytest.mark.slow  # trains, or runs the tools, through the real trainer


def fake_run(run_dir: Path) -> None:
    """A run directory with its config and one (empty but sealed) checkpoint."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_yaml(load_config(None, ["train.max_steps=1"])))
    save_checkpoint(Accelerator(), run_dir, 1, 1, {"train": {}})


def test_a_second_writer_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    fake_run(run_dir)
    lock = RunLock(run_dir)
    lock.acquire()
    holder = json.loads((run_dir / ".lock").read_text())
    assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
    with pytest.raises(ConfigError, match=f"in use by process {os.getpid()} on "):
        RunLock(run_dir).acquire()
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    assert train(None, [], resume=str(run_dir)) == 2  # before anything is built or written
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: run directory {run_dir} is in use by process {os.getpid()}")
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before
    lock.release()
    assert not (run_dir / ".lock").exists()


def test_a_stale_lock_is_taken_over(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": dead.pid, "since": "2026-11-29 23:00:00"}))
    lock = RunLock(tmp_path)  # its holder died (a SIGKILL leaves the file, the kernel the flock)
    lock.acquire()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
