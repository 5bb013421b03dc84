"""``ema.fused=true`` through the real trainer: its checkpoints hold every teacher tensor, a
resume is exact, the teachers equal the per-teacher update's bit for bit, and evaluation
loads the checkpoint strictly (issue 24: the flat buffer's shared storage lost the teacher)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssl_ema.engine.checkpoint import checkpoints
from ssl_ema.eval.trained import load_run
from tests.helpers import resume_from, run

pytestmark = pytest.mark.slow  # trains through the real trainer (and compiles the EMA kernel)

# Two teachers (the teacher and one more EMA), so the one compiled kernel updates several.
FUSED = ["method.name=byol", "train.grad_accumulation=1", "train.max_steps=4",
         "train.checkpoint_every=2", "ema.extra_momenta=[0.9]", "ema.buffers=average"]


def averaged(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every teacher tensor (the teacher and the extra EMAs), by state-dict name."""
    return {k: v for k, v in model.state_dict().items()
            if k.startswith(("teacher.", "ema_copies."))}


def test_fused_ema_checkpoints_round_trip(tmp_path: Path) -> None:
    fused, _ = run(tmp_path / "fused", *FUSED, "ema.fused=true")
    model = fused.accelerator.unwrap_model(fused.method)
    run_dir = tmp_path / "fused" / "run"
    # Every tensor of the method is in the file, each equal to the trained one (the shared
    # storage made Accelerate drop half of the teacher's tensors here).
    saved = load_file(str(checkpoints(run_dir)[-1] / "model.safetensors"))
    assert saved.keys() == model.state_dict().keys()
    for name, value in averaged(model).items():
        assert torch.equal(saved[name], value), name
    # Resumed from step 2, the run ends bit for bit where the uninterrupted one did (safetensors'
    # load refused the shared storage: "None is covering the entire storage").
    resume_from(fused, run_dir, 2)
    # The fused kernel rounds as torch's lerp_: the same teachers as the per-teacher update.
    plain, _ = run(tmp_path / "plain", *FUSED)
    expected = averaged(plain.accelerator.unwrap_model(plain.method))
    assert expected.keys() == averaged(model).keys()
    for name, value in averaged(model).items():
        assert torch.equal(value, expected[name]), name
    # Evaluation rebuilds the method (no fused buffers) and loads the checkpoint strictly.
    loaded = averaged(load_run(run_dir).method)
    for name, value in averaged(model).items():
        assert torch.equal(loaded[name], value.cpu()), name
