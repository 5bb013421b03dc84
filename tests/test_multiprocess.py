"""Two CPU processes (torchrun, gloo through Accelerate): one run, identical ranks."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, python
from tests.test_training import TINY


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_processes_train_one_model(tmp_path: Path, tools_env: dict[str, str]) -> None:
    overrides = [*TINY, "train.batch_size=32", "train.max_steps=4", "ema.extra_momenta=[0.9]",
                 "ema.buffers=average", "ema.period=2", "ema.recompute_bn_batches=1"]
    cmd = [python(), "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path), *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=tools_env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "ranks.json").read_text())
    # 2 processes x 8 per device x 2 accumulation = 32: the effective batch is kept.
    assert (r["world_size"], r["per_device_batch"]) == (2, 8)
    assert (r["step"], r["samples_seen"], r["ema_updates"]) == (4, 4 * 32, 2)
    # The EMA runs on each rank's unwrapped modules, BatchNorm statistics are synchronised (and
    # recomputed statistics all-reduced) before evaluation: the ranks stay bit-identical.
    assert r["parameter_rank_difference"] == 0.0
    assert r["buffer_rank_difference"] == 0.0
