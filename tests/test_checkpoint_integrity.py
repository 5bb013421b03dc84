"""Checkpoints are verified when read and never half-written: damaged files, a full disk."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from accelerate import Accelerator

from ssl_ema.config import ConfigError
from ssl_ema.engine.checkpoint import MANIFEST, checkpoints, damage
from ssl_ema.engine.launch import train
from ssl_ema.engine.run import prepare_run
from ssl_ema.engine.tracking import read_metrics
from tests.test_reliability import STEPS
from tests.test_stop import FAST
from tests.test_training import run

pytestmark = pytest.mark.slow  # trains, or runs the tools, through the real trainer


def test_resume_falls_back_past_damaged_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(tmp_path, *FAST, *STEPS)  # checkpoints at steps 1 to 4
    run_dir = tmp_path / "run"
    step = {c.name[-1]: c for c in checkpoints(run_dir)}
    manifest = json.loads((step["4"] / MANIFEST).read_text())["files"]
    assert {"model.safetensors", "optimizer.bin", "counters.json"} <= manifest.keys()
    assert damage(step["4"]) is None
    model = step["4"] / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])  # truncated
    (step["3"] / "model.safetensors").unlink()  # missing
    capsys.readouterr()
    _, resumed_dir, checkpoint = prepare_run(None, [], str(run_dir))
    assert (resumed_dir, checkpoint) == (run_dir, step["2"])
    warnings = capsys.readouterr().err.strip().splitlines()
    assert warnings == [
        f"warning: checkpoint {step['4']} is damaged (model.safetensors has 1000 bytes, the "
        f"manifest says {manifest['model.safetensors']['bytes']}); trying the one before it",
        f"warning: checkpoint {step['3']} is damaged (model.safetensors is missing); trying "
        "the one before it"]
    with pytest.raises(ConfigError, match="is damaged .model.safetensors is missing"):
        prepare_run(None, [], str(step["3"]))  # named explicitly: no fall-back

    # The run continues from step 2, and its log holds each step once.
    assert train(None, [], resume=str(run_dir)) == 0
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if r["event"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if r["event"] == "eval"] == [0, 4]
    assert damage(checkpoints(run_dir)[-1]) is None
    # Resuming the finished run says so and writes nothing.
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    capsys.readouterr()
    assert train(None, [], resume=str(run_dir)) == 0
    assert capsys.readouterr().out.strip() == (
        f"run {run_dir} finished at step 4 ({run_dir}/results.json); nothing to do")
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before

    for checkpoint in checkpoints(run_dir):  # no intact checkpoint left: one line, exit 2
        data = bytearray((checkpoint / "counters.json").read_bytes())
        data[-2] ^= 1  # one changed bit, the same size
        (checkpoint / "counters.json").write_bytes(bytes(data))
    capsys.readouterr()
    assert train(None, [], resume=str(run_dir)) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("error: --resume: no intact checkpoint under")
    assert "counters.json differs from its checksum" in line


def test_full_disk_during_a_save_stops_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    save_state = Accelerator.save_state

    def disk_full_at_step_2(self: Accelerator, output_dir: str) -> None:
        if not output_dir.endswith("step_00000002"):
            return save_state(self, output_dir)
        (Path(output_dir)).mkdir(parents=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 100)  # half-written
        raise OSError(errno.ENOSPC, "No space left on device",
                      str(Path(output_dir) / "optimizer.bin"))

    monkeypatch.setattr(Accelerator, "save_state", disk_full_at_step_2)
    recipe = tmp_path / "run.yaml"
    recipe.write_text("method:\n  name: byol\n")
    code = train(str(recipe), [*FAST, *STEPS, f"run.output_dir={tmp_path}"])
    (run_dir,) = (tmp_path / "run").iterdir()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1
    assert line == (
        f"error: could not write checkpoint {run_dir}/checkpoints/step_00000002: No space left "
        f"on device ({run_dir}/checkpoints/.tmp-step_00000002/optimizer.bin); the run stopped "
        f"and the last checkpoint, {run_dir}/checkpoints/step_00000001, is intact; free space "
        f"or make {run_dir} writable, then resume")
    assert [c.name for c in checkpoints(run_dir)] == ["step_00000001"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000001"]
    assert not (run_dir / "results.json").exists()
