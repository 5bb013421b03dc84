"""Stop signals and wall-clock checkpoints: real signals to real training runs on digits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssl_ema.engine.checkpoint import checkpoints
from ssl_ema.engine.launch import train
from ssl_ema.engine.stop import StopPoints, StopSignals
from ssl_ema.engine.tracking import read_metrics
from ssl_ema.engine.trainer import Trainer
from tests.conftest import ROOT, python
from tests.test_data import tiny_imagefolder
from tests.test_training import TINY

# timm's 0.4M-parameter test ResNet: each step and save a tenth of ResNet-18's time.
FAST = [*TINY, "model.backbone=test_resnet", "model.cifar_stem=false",
        "train.grad_accumulation=1", "train.keep_checkpoints=5"]


def recipe(tmp_path: Path) -> str:
    path = tmp_path / "run.yaml"
    path.write_text("method:\n  name: byol\n")
    return str(path)


def run_dir_of(out: Path) -> Path:
    (found,) = (out / "run").iterdir()  # <output_dir>/<name>/<timestamp>
    return found


def signal_at_step(monkeypatch: pytest.MonkeyPatch, step: int, signum: int) -> None:
    """Send ``signum`` to this process while optimizer step ``step`` runs (at its gradient
    clipping, between the backward and the optimizer's step)."""
    clip = Trainer._clip_gradients

    def clip_and_signal(self: Trainer) -> torch.Tensor | None:
        if self.state.step + 1 == step:
            os.kill(os.getpid(), signum)
        return clip(self)

    monkeypatch.setattr(Trainer, "_clip_gradients", clip_and_signal)


@pytest.mark.slow
def test_sigint_checkpoints_stops_and_resumes_bitwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGINT in the last step of epoch 0 (6 images, 3 steps an epoch), whose evaluation is
    then still due: the resumed run evaluates it, and ends bitwise as the uninterrupted one."""
    root = tiny_imagefolder(tmp_path / "imgs")
    (root / "train" / "class1" / "broken.png").unlink()
    common = [*FAST, "data.dataset=imagefolder", f"data.root={root}", "train.batch_size=2",
              "scaling.reference_batch=2", "train.max_steps=0", "train.epochs=2",
              "eval.every_epochs=1", "eval.knn_k=2"]
    # Uninterrupted, with a wall-clock checkpoint due after every step.
    assert train(recipe(tmp_path), [*common, f"run.output_dir={tmp_path / 'full'}",
                                    "train.checkpoint_every_minutes=1e-9"]) == 0
    full = run_dir_of(tmp_path / "full")
    assert [c.name for c in checkpoints(full)] == [f"step_{i:08d}" for i in range(2, 7)]

    capsys.readouterr()
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job
    with monkeypatch.context() as patch:
        signal_at_step(patch, 3, signal.SIGINT)
        code = train(recipe(tmp_path), [*common, f"run.output_dir={tmp_path / 'cut'}"])
    err = capsys.readouterr().err.strip().splitlines()
    cut = run_dir_of(tmp_path / "cut")
    assert code == 130  # 128 + SIGINT
    assert err[-1] == (f"stopped by SIGINT at step 3 (epoch 1), checkpoint written to "
                       f"{cut}/checkpoints/step_00000003; continue with: tools/train.py "
                       f"--resume {cut}")
    assert not any("Traceback" in line for line in err)
    assert [c.name for c in checkpoints(cut)] == ["step_00000003"]  # wall clock: 30 min
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored

    assert train(None, [], resume=str(cut)) == 0
    for name in ("model.safetensors", "optimizer.bin"):
        a, b = full / "checkpoints/step_00000006" / name, cut / "checkpoints/step_00000006" / name
        if name.endswith(".safetensors"):
            ta, tb = load_file(a), load_file(b)
            assert ta.keys() == tb.keys()
            assert all(torch.equal(ta[k], tb[k]) for k in ta), name
        else:
            assert a.read_bytes() == b.read_bytes(), name
    rows, ref = read_metrics(cut / "metrics.jsonl"), read_metrics(full / "metrics.jsonl")
    assert [r["step"] for r in rows if r["event"] == "train"] == list(range(1, 7))
    evals = [r for r in rows if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert evals == [r for r in ref if r["event"] == "eval"]  # the same values
    assert [r["signal"] for r in rows if r["event"] == "stopped"] == ["SIGINT"]


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_its_trainer(
    tmp_path: Path, tools_env: dict[str, str]
) -> None:
    """A cluster pre-empts `accelerate launch`: its train.py child gets SIGTERM (prctl
    PR_SET_PDEATHSIG), checkpoints and stops, instead of training on orphaned."""
    cmd = [python(), "-m", "accelerate.commands.launch", "--num_processes", "1",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "tools" / "train.py"), recipe(tmp_path), *FAST,
           f"run.output_dir={tmp_path}", "train.max_steps=0", "train.epochs=20"]
    launcher = subprocess.Popen(cmd, env=tools_env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (lock := _lock_once_trained(tmp_path)):
            assert launcher.poll() is None, launcher.stderr.read() if launcher.stderr else ""
            assert time.monotonic() < deadline, "no training step within 120 s"
            time.sleep(0.2)
        trainer = json.loads(lock.read_text())  # the lock names the writer: train.py
        assert trainer["pid"] != launcher.pid
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=120)  # the child holds the pipe until it exits
    finally:
        launcher.kill()
    assert _exits(trainer["pid"], within_s=30)  # the trainer is gone too
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("stopped by")]
    assert line.startswith("stopped by SIGTERM at step ")
    step = int(line.split(" at step ")[1].split()[0])
    run_dir = lock.parent
    assert [c.name for c in checkpoints(run_dir)] == [f"step_{step:08d}"]
    assert not lock.exists()  # released


def _exits(pid: int, within_s: float) -> bool:
    """Has ``pid`` exited (gone, or a zombie waiting for its new parent) within the time?"""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.1)
    return False


def _lock_once_trained(out: Path) -> Path | None:
    logs = list(out.glob("run/*/metrics.jsonl"))
    if logs and '"event": "train"' in logs[0].read_text():
        return logs[0].parent / ".lock"
    return None


def test_stop_signals_set_a_flag_and_restore_the_handlers() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == before


def test_processes_compare_flags_every_k_steps() -> None:
    """Several processes: the flags are all-reduced only at every ``check_every``-th step, where
    all ranks call the collective, so they stop (or checkpoint) at the same step."""
    calls: list[list[int]] = []

    def all_reduce_max(flags: torch.Tensor) -> torch.Tensor:
        calls.append(flags.tolist())
        return torch.maximum(flags, torch.tensor([15, 0, 0]))  # another rank got SIGTERM

    signals = StopSignals()
    points = StopPoints(signals, 0.0, 5, all_reduce_max, torch.device("cpu"))
    assert [points.check(s) for s in (1, 2, 3, 4)] == [(0, False, False)] * 4 and calls == []
    assert points.check(5) == (15, False, False) and calls == [[0, 0, 0]]
    # One process: the local flag, at every step, without a collective.
    signals.received = signal.SIGUSR1
    assert StopPoints(signals, 0.0, 5, None, torch.device("cpu")).check(1) == (10, False, False)
    # The deadline: passed on this process, and reported like a signal.
    late = StopPoints(StopSignals(), 0.0, 5, None, torch.device("cpu"), stop_at=0.0)
    assert late.check(1) == (0, True, False)


@pytest.mark.slow
def test_a_second_signal_stops_at_once(tools_env: dict[str, str]) -> None:
    """A user who will not wait for the checkpoint: the second signal ends the process. Not a
    repeat within a second: a dying launcher sends one SIGTERM per thread of its child."""
    code = ("import os, signal, time\n"
            "from ssl_ema.engine.stop import StopSignals\n"
            "with StopSignals() as s:\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    assert s.received == signal.SIGINT\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"  # the launcher's duplicates: ignored
            "    time.sleep(1.1)\n"
            "    assert s.received == signal.SIGINT\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(30)\n")
    proc = subprocess.run([python(), "-c", code], env=tools_env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 143, proc.stderr  # 128 + SIGTERM, no traceback
    assert proc.stderr == ""
