"""Two CPU processes (torchrun, gloo through Accelerate): one run, identical ranks."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ssl_ema.engine.checkpoint import checkpoints
from tests.helpers import ROOT, TINY, python, run

pytestmark = pytest.mark.slow  # trains, or runs the tools, through the real trainer


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_processes_train_one_model(tmp_path: Path, tools_env: dict[str, str]) -> None:
    # Progressive scaling too: batch 256 in epoch 0, 512 in epoch 1.
    overrides = [*TINY, "train.batch_size=256", "train.max_steps=0", "train.epochs=2",
                 "train.batch_schedule=[[1, 512]]", "ema.extra_momenta=[0.9]",
                 "ema.buffers=average", "ema.period=2", "ema.recompute_bn_batches=1"]
    cmd = [python(), "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path), *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=tools_env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "ranks.json").read_text())
    # 2 processes x 64 per device x 2 accumulation = 256: the effective batch is kept.
    assert (r["world_size"], r["per_device_batch"]) == (2, 64)
    # 1437 images: epoch 0 is 11 micro-batches of 128 (6 steps, the last one a single micro-
    # batch: Accelerate syncs at the end of the data), epoch 1 is 5 of 256 (3 steps), exactly
    # as in one process; the EMA every 2nd step.
    assert (r["step"], r["samples_seen"], r["ema_updates"]) == (9, 11 * 128 + 5 * 256, 4)
    # The EMA runs on each rank's unwrapped modules, BatchNorm statistics are synchronised (and
    # recomputed statistics all-reduced) before evaluation: the ranks stay bit-identical.
    assert r["parameter_rank_difference"] == 0.0
    assert r["buffer_rank_difference"] == 0.0
    # Training released the process group before exit: gloo's worker threads are joined, so none
    # can meet interpreter finalisation (which aborted rank 1 in two CI runs).
    for rank in range(2):
        threads = json.loads((tmp_path / f"threads_{rank}.json").read_text())
        assert "pt_gloo_runloop" not in threads, threads


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_processes_match_one_process(tmp_path: Path, tools_env: dict[str, str]) -> None:
    """Same global batch on 1 or 2 processes -> the same teacher, within float tolerance.

    A BatchNorm-free model (ViT + DINO head without BN), since BatchNorm statistics are per
    process by design; DINO's centre is all-reduced. Views are seeded per sample, so both runs
    see the same augmentations, and Accelerate hands rank r the r-th per-device slice of the same
    global order.
    """
    overrides = [*TINY, "method.name=dino", "model.backbone=vit_tiny_patch16_224",
                 "model.patch_size=4", "model.cifar_stem=false", "dino.output_dim=64",
                 "dino.hidden_dim=32", "dino.bottleneck_dim=16", "dino.local_views=2",
                 "dino.local_size=4", "train.max_steps=3"]
    cmd = [python(), "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path / "two"), *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=tools_env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "ranks.json").read_text())["world_size"] == 2
    one_trainer, _ = run(tmp_path / "one", *overrides)
    model = one_trainer.accelerator.unwrap_model(one_trainer.method)
    for role in ("student", "teacher"):
        one = getattr(model, role).state_dict()
        two = torch.load(tmp_path / "two" / f"{role}.pt", weights_only=True)
        assert one.keys() == two.keys()
        for name, value in one.items():
            torch.testing.assert_close(value, two[name], rtol=1e-4, atol=1e-5, msg=name)
    # Not trivially equal: three steps moved the student away from the teacher.
    s, t = model.student["backbone"].state_dict(), model.teacher["backbone"].state_dict()
    assert max((s[k] - t[k]).abs().max().item() for k in s) > 1e-3


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_the_python_api_on_two_processes(tmp_path: Path, tools_env: dict[str, str]) -> None:
    """ssl_ema.train from a script started on 2 processes, each building the backbone module
    from its own seed: one run folder, and ranks that end identical (the prepared method's
    states, teacher included, start from rank 0's)."""
    cmd = [python(), "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path), "given", *TINY,
           "train.max_steps=3", "run.name=given"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=tools_env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "given").iterdir()
    assert json.loads((run_dir / "results.json").read_text())["step"] == 3
    for role in ("teacher", "student"):
        ranks = [torch.load(tmp_path / f"{role}_{r}.pt", weights_only=True) for r in (0, 1)]
        assert ranks[0].keys() == ranks[1].keys()
        for name, value in ranks[0].items():
            assert torch.equal(value, ranks[1][name]), (role, name)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_a_resume_on_another_number_of_processes_is_refused(tmp_path: Path,
                                                             tools_env: dict[str, str]) -> None:
    """A 1-process run resumed on 2 processes: the same effective batch, another split (and
    per-process BatchNorm statistics): refused in one line before anything is written; it used
    to train on, to other results than the uninterrupted run."""
    run(tmp_path, "train.max_steps=2")  # checkpoints/step_00000002, one process
    run_dir = tmp_path / "run"
    before = {name: (run_dir / name).read_bytes() for name in ("metrics.jsonl", "header.json")}
    cmd = [python(), "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(ROOT / "tools" / "train.py"), "--resume", str(run_dir), "train.max_steps=3"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=tools_env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    expected = (f"error: --resume: {run_dir}/checkpoints/step_00000002 was written by 1 "
                "process(es) (1 x 8 per device x 2 accumulation = 16), this start has 2 (2 x 4 "
                "per device x 2 accumulation = 16); the split changes BatchNorm statistics, "
                "random states and data shards: resume on 1 process(es), or start a new run")
    assert expected in proc.stderr.splitlines(), proc.stderr[-3000:]
    assert [c.name for c in checkpoints(run_dir)] == ["step_00000002"]
    assert {name: (run_dir / name).read_bytes() for name in before} == before
