"""Stop signals and wall-clock checkpoints: real signals to real training runs on digits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from ssl_ema.engine.checkpoint import checkpoints, damage
from ssl_ema.engine.launch import train
from ssl_ema.engine.stop import StopPoints, StopSignals
from ssl_ema.engine.tracking import read_metrics
from ssl_ema.engine.trainer import Trainer
from ssl_ema.eval import teacher_student
from tests.helpers import FAST, ROOT, python, tiny_imagefolder


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


def common(root: Path) -> list[str]:
    """6 images, 3 steps an epoch, 2 epochs, an evaluation after each."""
    return [*FAST, "data.dataset=imagefolder", f"data.root={root}", "train.batch_size=2",
            "scaling.reference_batch=2", "train.max_steps=0", "train.epochs=2",
            "eval.every_epochs=1", "eval.knn_k=2"]


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The uninterrupted run (its run directory, and the overrides that made it), with a
    wall-clock checkpoint due after every step."""
    tmp = tmp_path_factory.mktemp("full")
    root = tiny_imagefolder(tmp / "imgs")
    (root / "train" / "class1" / "broken.png").unlink()
    overrides = common(root)
    assert train(recipe(tmp), [*overrides, f"run.output_dir={tmp / 'out'}",
                               "train.checkpoint_every_minutes=1e-9"]) == 0
    run_dir = run_dir_of(tmp / "out")
    assert [c.name for c in checkpoints(run_dir)] == [f"step_{i:08d}" for i in range(2, 7)]
    return run_dir, overrides


def same_checkpoint(a: Path, b: Path, files: tuple[str, ...] = ("optimizer.bin",)) -> None:
    """Every tensor of the model (weights and buffers) and the ``files`` are bitwise equal."""
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys()
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def stopped_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err)
    return err[-1]


@pytest.mark.slow
def test_sigint_checkpoints_stops_and_resumes_bitwise(
    tmp_path: Path, full: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGINT in the last step of epoch 0, after its backward pass: the step finishes. Its
    epoch's evaluation is then still due: the resumed run evaluates it, and ends bitwise as the
    uninterrupted one."""
    full_dir, overrides = full
    capsys.readouterr()
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job
    with monkeypatch.context() as patch:
        signal_at_step(patch, 3, signal.SIGINT)
        code = train(recipe(tmp_path), [*overrides, f"run.output_dir={tmp_path / 'cut'}"])
    cut = run_dir_of(tmp_path / "cut")
    assert code == 130  # 128 + SIGINT
    assert stopped_line(capsys) == (
        f"stopped by SIGINT at step 3 (epoch 1), checkpoint written to {cut}/checkpoints/"
        f"step_00000003; continue with: tools/train.py --resume {cut}")
    assert [c.name for c in checkpoints(cut)] == ["step_00000003"]  # wall clock: 30 min
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored

    assert train(None, [], resume=str(cut)) == 0
    same_checkpoint(full_dir / "checkpoints/step_00000006", cut / "checkpoints/step_00000006")
    rows, ref = read_metrics(cut / "metrics.jsonl"), read_metrics(full_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if r["event"] == "train"] == list(range(1, 7))
    evals = [r for r in rows if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert evals == [r for r in ref if r["event"] == "eval"]  # the same values
    assert [r["signal"] for r in rows if r["event"] == "stopped"] == ["SIGINT"]


@pytest.mark.slow
def test_a_signal_in_a_backward_pass_rolls_the_step_back(
    tmp_path: Path, full: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGTERM in the middle of step 5, whose forward pass moved the BatchNorm statistics and
    drew a random number (as dropout would): the step is abandoned, and the checkpoint is the
    uninterrupted run's step 4, byte for byte (model, optimizer, random states and Accelerate's
    step counter); the resumed run ends bitwise as the uninterrupted one."""
    full_dir, overrides = full
    backward, calls = Accelerator.backward, [0]

    def signal_in_backward(self: Accelerator, loss: torch.Tensor, **kwargs: Any) -> None:
        calls[0] += 1
        if calls[0] == 5:
            torch.rand(())

            def signal_now(grad: torch.Tensor) -> None:
                os.kill(os.getpid(), signal.SIGTERM)

            loss.register_hook(signal_now)  # runs inside the backward pass
        backward(self, loss, **kwargs)

    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(Accelerator, "backward", signal_in_backward)
        code = train(recipe(tmp_path), [*overrides, f"run.output_dir={tmp_path / 'cut'}"])
    cut = run_dir_of(tmp_path / "cut")
    assert (code, calls[0]) == (143, 5)
    assert stopped_line(capsys).startswith("stopped by SIGTERM at step 4 (epoch 1), checkpoint ")
    (ckpt,) = checkpoints(cut)
    same_checkpoint(full_dir / "checkpoints/step_00000004", ckpt,
                    ("optimizer.bin", "random_states_0.pkl"))
    counters = json.loads((ckpt / "counters.json").read_text())
    assert counters.pop("eval_pending") is False
    assert counters == json.loads((full_dir / "checkpoints/step_00000004/counters.json")
                                  .read_text())
    stops = [r for r in read_metrics(cut / "metrics.jsonl") if r["event"] == "stopped"]
    assert [(r["step"], r["interrupted"]) for r in stops] == [(4, "step")]
    assert train(None, [], resume=str(cut)) == 0
    same_checkpoint(full_dir / "checkpoints/step_00000006", cut / "checkpoints/step_00000006")


@pytest.mark.slow
def test_a_signal_during_the_final_evaluation_stops_it(
    tmp_path: Path, full: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGUSR1 while the final evaluation scores the teacher: it stops there (not after the
    evaluation), with a checkpoint of the last step and no results; the resumed run evaluates
    and ends with the uninterrupted run's results and checkpoint."""
    full_dir, overrides = full
    score, evaluate = teacher_student.knn_score, Trainer.evaluate
    final = [False]

    def evaluate_noting_the_last(self: Trainer) -> dict[str, float]:
        final[0] = self.state.step == self.total_steps
        return evaluate(self)

    def signal_in_scoring(backbone: torch.nn.Module, ctx: Any) -> float:
        if final[0]:
            os.kill(os.getpid(), signal.SIGUSR1)
        return score(backbone, ctx)

    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "evaluate", evaluate_noting_the_last)
        patch.setattr(teacher_student, "knn_score", signal_in_scoring)
        code = train(recipe(tmp_path), [*overrides, f"run.output_dir={tmp_path / 'cut'}"])
    cut = run_dir_of(tmp_path / "cut")
    assert code == 138
    assert stopped_line(capsys).startswith("stopped by SIGUSR1 at step 6 (epoch 2), checkpoint ")
    assert [c.name for c in checkpoints(cut)] == ["step_00000006"]
    assert not (cut / "results.json").exists()
    rows = read_metrics(cut / "metrics.jsonl")
    assert [r["step"] for r in rows if r["event"] == "eval"] == [0, 3]
    assert [r["interrupted"] for r in rows if r["event"] == "stopped"] == ["evaluation"]

    assert train(None, [], resume=str(cut)) == 0
    assert (cut / "results.json").read_text() == (full_dir / "results.json").read_text()
    same_checkpoint(full_dir / "checkpoints/step_00000006", cut / "checkpoints/step_00000006")


@pytest.mark.slow
def test_sigterm_to_the_launcher_mid_step_checkpoints_within_its_grace(
    tmp_path: Path, tools_env: dict[str, str]
) -> None:
    """A cluster pre-empts `accelerate launch`, which forwards SIGTERM to train.py and kills it
    5 s later (accelerate/commands/launch.py, _terminate_process_tree), in the middle of a step
    that takes longer than that (test_resnet at 128 px, batch 128: over 10 s on one thread of
    the 2-core test machine). The trainer abandons the step and checkpoints step 0 within the
    grace, releases its lock and exits; the launcher exits 143."""
    cmd = [python(), "-m", "accelerate.commands.launch", "--num_processes", "1",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "tools" / "train.py"), recipe(tmp_path), *FAST,
           "data.image_size=128", "train.batch_size=128", "scaling.reference_batch=128",
           f"run.output_dir={tmp_path}", "train.max_steps=2", "eval.every_epochs=0"]
    env = {**tools_env, "SSL_EMA_CPU_THREADS": "1"}
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (lock := _lock_once_evaluated(tmp_path)):
            assert launcher.poll() is None, launcher.stderr.read() if launcher.stderr else ""
            assert time.monotonic() < deadline, "no evaluation within 120 s"
            time.sleep(0.1)
        time.sleep(1.0)  # into step 1
        trainer = json.loads(lock.read_text())  # the lock names the writer: train.py
        assert trainer["pid"] != launcher.pid
        sent = time.monotonic()
        launcher.send_signal(signal.SIGTERM)
        assert _exits(trainer["pid"], within_s=30)
        took = time.monotonic() - sent
        _, err = launcher.communicate(timeout=60)
    finally:
        launcher.kill()
    assert launcher.returncode == 143
    assert took < 5.0  # accelerate's grace (a SIGKILL would leave no checkpoint anyway)
    assert "Traceback" not in err
    run_dir = lock.parent
    (line,) = [x for x in err.splitlines() if x.startswith("stopped by")]
    assert line.startswith(f"stopped by SIGTERM at step 0 (epoch 0), checkpoint written to "
                           f"{run_dir}/checkpoints/step_00000000")
    stops = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["event"] == "stopped"]
    assert [(r["step"], r["interrupted"]) for r in stops] == [(0, "step")]
    assert damage(checkpoints(run_dir)[0]) is None
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


def _lock_once_evaluated(out: Path) -> Path | None:
    """The run's lock, once the evaluation before training is logged (training starts)."""
    logs = list(out.glob("run/*/metrics.jsonl"))
    if logs and '"event": "eval"' in logs[0].read_text():
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
