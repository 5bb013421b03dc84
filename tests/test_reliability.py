"""Failures must not lose work: non-finite losses, a process killed while saving."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssl_ema.config import load_config
from ssl_ema.engine.checkpoint import checkpoints
from ssl_ema.engine.guard import NonFiniteLoss
from ssl_ema.engine.launch import train
from ssl_ema.engine.run import prepare_run
from ssl_ema.engine.trainer import Trainer
from ssl_ema.methods.byol import BYOL
from tests.helpers import ROOT, STEPS, TINY, python, run

pytestmark = pytest.mark.slow  # trains, or runs the tools, through the real trainer


@pytest.fixture
def nan_on_third_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """The third forward pass (step 3) sees a non-finite image, which makes its BatchNorm
    statistics and its loss NaN (as an overflowing activation would)."""
    forward, calls = BYOL.forward, [0]

    def poisoned(self: BYOL, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        calls[0] += 1
        if calls[0] == 3:
            batch = (batch[0] * float("nan"), *batch[1:])
        return forward(self, batch)

    monkeypatch.setattr(BYOL, "forward", poisoned)


@pytest.mark.usefixtures("nan_on_third_forward")
def test_nonfinite_loss_stops_before_writing(tmp_path: Path) -> None:
    """... and advises what --resume accepts: train.nonfinite=skip."""
    with pytest.raises(NonFiniteLoss, match=r"step 3 \(epoch 0\).*step_00000002") as stop:
        run(tmp_path, *STEPS)
    run_dir = tmp_path / "run"
    assert [c.name for c in checkpoints(run_dir)] == ["step_00000001", "step_00000002"]
    assert not (run_dir / "results.json").exists()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["event"] == "train"] == [1, 2]
    assert f"tools/train.py --resume {run_dir} train.nonfinite=skip" in str(stop.value)
    _, _, checkpoint = prepare_run(None, ["train.nonfinite=skip"], str(run_dir))
    assert checkpoint == checkpoints(run_dir)[-1]


@pytest.mark.usefixtures("nan_on_third_forward")
def test_nonfinite_loss_skips_the_step_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The skipped step's forward pass is undone too (its NaN BatchNorm statistics), and the
    summary and results.json count it."""
    recipe = tmp_path / "run.yaml"
    recipe.write_text("method:\n  name: byol\n")
    assert train(str(recipe), [*TINY, *STEPS, "train.nonfinite=skip",
                               f"run.output_dir={tmp_path}"]) == 0
    (run_dir,) = (tmp_path / "run").iterdir()
    counters = json.loads((checkpoints(run_dir)[-1] / "counters.json").read_text())
    assert (counters["train"]["step"], counters["train"]["skipped_steps"],
            counters["ema"]["num_updates"]) == (4, 1, 3)
    model = load_file(checkpoints(run_dir)[-1] / "model.safetensors")
    assert [k for k, t in model.items() if not torch.isfinite(t).all()] == []
    assert json.loads((run_dir / "results.json").read_text())["skipped_steps"] == 1
    assert "1 of 4 optimizer steps skipped for a non-finite loss" in capsys.readouterr().out


def test_kill_during_save_keeps_the_previous_checkpoint(
    tmp_path: Path, tools_env: dict[str, str]
) -> None:
    cmd = [python(), str(ROOT / "tests" / "kill_worker.py"), str(tmp_path), *TINY, *STEPS]
    proc = subprocess.Popen(cmd, env=tools_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "saving").exists():
            assert proc.poll() is None, "the worker exited before its second save"
            assert time.monotonic() < deadline, "the worker never reached its second save"
            time.sleep(0.2)
    finally:
        proc.kill()  # SIGKILL: no handler, no cleanup, mid-save
        proc.wait()
    run_dir = tmp_path / "run"
    assert (run_dir / "checkpoints" / ".tmp-step_00000002").is_dir()  # the interrupted save
    assert [c.name for c in checkpoints(run_dir)] == ["step_00000001"]  # ignored
    # The previous checkpoint loads and the run finishes from it.
    cfg = load_config(None, [f"run.output_dir={tmp_path}", *TINY, *STEPS])
    resumed = Trainer(cfg, run_dir, checkpoints(run_dir)[0])
    resumed.fit()
    assert resumed.state.step == 4
    assert [c.name for c in checkpoints(run_dir)][-1] == "step_00000004"
    assert not (run_dir / "checkpoints" / ".tmp-step_00000002").exists()  # replaced on re-save


def test_resume_with_another_recipe_is_refused_untouched(
    tmp_path: Path, tools_env: dict[str, str]
) -> None:
    run(tmp_path, *STEPS)
    run_dir = tmp_path / "run"
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    train = [python(), str(ROOT / "tools" / "train.py")]
    for args, message in [
        (["--resume", str(run_dir), "optim.lr=0.1"], "the recipe differs from the run's config"),
        (["--resume", str(tmp_path / "nowhere")], "no checkpoint under"),
    ]:
        proc = subprocess.run([*train, *args], env=tools_env, capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before  # nothing written


def test_bad_input_with_the_documented_command_and_under_accelerate(
    tmp_path: Path, tools_env: dict[str, str]
) -> None:
    """README's command, python tools/train.py, reports a typo in one line with exit code 2.
    Under `accelerate launch` the same line is followed by accelerate's CalledProcessError
    traceback and exit code 1 (accelerate/commands/launch.py, _run_subprocess), which is why
    the docs run one process without a launcher; this pins that reason."""
    args = [str(ROOT / "tools" / "train.py"), str(ROOT / "recipes" / "quickstart.yaml"),
            "train.epoch=3", f"run.output_dir={tmp_path}"]
    launch = [python(), "-m", "accelerate.commands.launch", "--num_processes", "1",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    direct, launched = (subprocess.run([*prefix, *args], env=tools_env, capture_output=True,
                                       text=True) for prefix in ([python()], launch))
    (line,) = direct.stderr.strip().splitlines()
    assert direct.returncode == 2 and line.startswith("error: unknown key 'train.epoch'")
    assert launched.returncode == 1 and launched.stderr.startswith(line)
    assert "subprocess.CalledProcessError" in launched.stderr
    assert not tmp_path.joinpath("quickstart").exists()


def test_checkpoint_files_load_without_unrestricted_unpickling(tmp_path: Path) -> None:
    """Model in safetensors, counters in JSON; every pickle-format file loads with
    ``weights_only=True`` (Accelerate's loader, which allow-lists NumPy's RNG-state types)."""
    from accelerate.utils import load

    run(tmp_path, *STEPS)
    ckpt = checkpoints(tmp_path / "run")[-1]
    names = sorted(p.name for p in ckpt.iterdir())
    assert "model.safetensors" in names and "counters.json" in names
    assert not [n for n in names if n.startswith("custom_checkpoint")]  # no pickled objects
    for path in ckpt.iterdir():
        if path.suffix in (".bin", ".pkl"):
            load(path, weights_only=True)  # raises on anything outside the allow-list
    counters = json.loads((ckpt / "counters.json").read_text())
    assert counters["train"]["step"] == 4 and counters["ema"]["num_updates"] == 4
