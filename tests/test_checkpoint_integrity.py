"""Checkpoints are verified when read and never half-written: damaged files, stray folders, a
real full disk, damaged run files."""

from __future__ import annotations

import contextlib
import json
import re
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from accelerate import Accelerator

from ssl_ema.config import ConfigError
from ssl_ema.engine.checkpoint import MANIFEST, checkpoints, damage, save_checkpoint
from ssl_ema.engine.launch import train
from ssl_ema.engine.run import prepare_run
from ssl_ema.engine.tracking import read_metrics
from tests.helpers import FAST, STEPS, load_tool, run


@pytest.mark.slow
def test_resume_falls_back_past_damaged_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """And so do tools/export.py, eval.py and transfer.py (`resolve_checkpoint`); folders that
    are not checkpoints (a backup, a file manager's copy) are ignored with a warning."""
    run(tmp_path, *FAST, *STEPS)  # checkpoints at steps 1 to 4
    run_dir = tmp_path / "run"
    step = {c.name[-1]: c for c in checkpoints(run_dir)}
    strays = [run_dir / "checkpoints" / name for name in ("step_00000004.bak",
                                                           "step_00000009 (copy)")]
    for stray in strays:
        stray.mkdir()
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
    assert sorted(warnings[:2]) == [f"warning: ignoring {stray}: not a checkpoint (those are "
                                    "folders named step_NNNNNNNN)" for stray in strays]
    assert warnings[2:] == [
        f"warning: checkpoint {step['4']} is damaged (model.safetensors has 1000 bytes, the "
        f"manifest says {manifest['model.safetensors']['bytes']}); trying the one before it",
        f"warning: checkpoint {step['3']} is damaged (model.safetensors is missing); trying "
        "the one before it"]
    with pytest.raises(ConfigError, match="is damaged .model.safetensors is missing"):
        prepare_run(None, [], str(step["3"]))  # named explicitly: no fall-back
    export = load_tool("export")
    assert export.main([str(run_dir)]) == 0  # the same fall-back as --resume
    assert (run_dir / "export" / "step_00000002-teacher.safetensors").is_file()
    assert export.main([str(step["4"])]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "model.safetensors has 1000 bytes, the manifest says "
        f"{manifest['model.safetensors']['bytes']}); pass the run directory to use its newest "
        "intact checkpoint")

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


@contextlib.contextmanager
def small_disk(path: Path, mib: int) -> Iterator[bool]:
    """A real filesystem of ``mib`` MiB mounted at ``path`` (tmpfs), where this process may mount
    one (root, with CAP_SYS_ADMIN); False where it may not (a loop device needs the same)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=True)


@contextlib.contextmanager
def file_size_limit(mib: int) -> Iterator[None]:
    """No file of this process may grow past ``mib`` MiB: writes fail with EFBIG (CPython
    ignores SIGXFSZ), as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (mib << 20, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.slow
def test_full_disk_during_a_save_stops_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 7 MiB tmpfs as run.output_dir: the first checkpoint (4.6 MB) fits, the second does
    not (safetensors reports it as SafetensorError, torch.save as RuntimeError). Where the test
    may not mount, a file size limit fails the first checkpoint instead."""
    recipe = tmp_path / "run.yaml"
    recipe.write_text("method:\n  name: byol\n")
    out = tmp_path / "disk"
    with small_disk(out, 7) as mounted:
        limit = contextlib.nullcontext() if mounted else file_size_limit(2)
        with limit:
            code = train(str(recipe), [*FAST, *STEPS, f"run.output_dir={out}"])
        (run_dir,) = (out / "run").iterdir()
        err = capsys.readouterr().err
        folders = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert code == 1 and "Traceback" not in err
    step = 2 if mounted else 1
    kept = (f"the last checkpoint, {run_dir}/checkpoints/step_00000001, is intact" if mounted
            else "no checkpoint was written before")
    assert re.fullmatch(
        f"error: could not write checkpoint {run_dir}/checkpoints/step_{step:08d}: "
        f"(No space left on device|File too large) .*{run_dir}/checkpoints/.tmp-step_{step:08d}"
        f".*; the run stopped and {re.escape(kept)}; free space or make {run_dir} writable, "
        "then resume", err.strip().splitlines()[-1])
    assert folders == (["step_00000001"] if mounted else [])  # the half-written one removed
    assert not (run_dir / "results.json").exists()


def test_only_intact_checkpoints_count_towards_keep(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """keep 2 of step 1, step 2, a truncated step 3 and the new step 4: steps 2 and 4 stay."""
    accelerator = Accelerator()
    for step in (1, 2, 3):
        save_checkpoint(accelerator, tmp_path, step, 5, {"step": step})
    states = tmp_path / "checkpoints/step_00000003/random_states_0.pkl"
    states.write_bytes(states.read_bytes()[:100])
    capsys.readouterr()
    save_checkpoint(accelerator, tmp_path, 4, 2, {"step": 4})
    assert [c.name for c in checkpoints(tmp_path)] == ["step_00000002", "step_00000004"]
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"warning: removing damaged checkpoint {states.parent} "
                           "(random_states_0.pkl has 100 bytes, the manifest says ")


@pytest.mark.parametrize(("damage_it", "message"), ids=[
    "config-missing", "config-not-yaml", "config-latin-1", "config-a-list", "header-not-json"],
    argvalues=[
    (lambda run: (run / "config.yaml").unlink(), "config.yaml' is missing: without the run's "
     "resolved config it cannot be rebuilt; restore the file, or start a new run"),
    (lambda run: (run / "config.yaml").write_text("train: [1,\n"), "config.yaml' is damaged "
     "(not readable YAML at line 2, column 1: "),
    (lambda run: (run / "config.yaml").write_bytes(b"run: {name: caf\xe9}\n"),
     "config.yaml' is damaged (not readable YAML: 'utf-8' codec can't decode"),
    (lambda run: (run / "config.yaml").write_text("- byol\n"), "config.yaml' is damaged (a "
     "list, not a mapping of sections)"),
    (lambda run: (run / "header.json").write_text('{"given": '), "header.json' is damaged "
     "(Expecting value: line 1 column 11 (char 10)); it says whether the run trained on objects "
     "given from Python: restore it, or delete it if the run trained from a recipe"),
])
def test_damaged_run_files_refuse_a_resume_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage_it: Any, message: str
) -> None:
    run_dir = tmp_path / "run"
    save_checkpoint(Accelerator(), run_dir, 1, 5, {})
    (run_dir / "config.yaml").write_text("method:\n  name: byol\n")
    (run_dir / "header.json").write_text("{}\n")
    damage_it(run_dir)
    capsys.readouterr()
    assert train(None, [], resume=str(run_dir)) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: '") and message in line
