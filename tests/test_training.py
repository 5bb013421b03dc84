"""Short CPU training runs through the real trainer: values, not just "it runs"."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ssl_ema.engine.checkpoint import checkpoints
from ssl_ema.engine.tracking import read_metrics
from tests.helpers import METHOD_TINY, SELF_SUPERVISED, resume_from, run

pytestmark = pytest.mark.slow  # trains, or runs the tools, through the real trainer


@pytest.mark.parametrize("method", SELF_SUPERVISED)
def test_three_steps_with_accumulation(tmp_path: Path, method: str) -> None:
    trainer, result = run(tmp_path, f"method.name={method}", *METHOD_TINY[method])
    st = trainer.state
    # 3 optimizer steps of 2 micro-batches each: the EMA ran 3 times, not 6.
    assert (st.step, st.batch_in_epoch, trainer.ema.num_updates) == (3, 6, 3)
    assert st.samples_seen == 3 * 16
    train = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    # momentum follows the cosine schedule of progress = samples seen / total samples
    model = trainer.accelerator.unwrap_model(trainer.method)
    total = trainer.total_samples
    assert train[1]["momentum"] == pytest.approx(model.momentum(16 / total))
    assert 0.0 <= result["knn_teacher"] <= 1.0 and result["knn_random"] >= 0.0
    header = json.loads((tmp_path / "run" / "header.json").read_text())
    assert header["effective_batch"] == 16 and header["per_device_batch"] == 8
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["step_00000003"]


def test_weight_decay_schedule_and_gradient_clipping(tmp_path: Path) -> None:
    trainer, _ = run(tmp_path, "method.name=dino", *METHOD_TINY["dino"])
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["event"] == "train"]
    total = trainer.total_samples
    for r in rows:  # cosine 0.04 -> 0.4 in samples seen, on the decayed group only
        progress = (r["samples_seen"] - r["batch"]) / total
        assert r["weight_decay"] == pytest.approx(0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(
            math.pi * progress)))
        assert r["grad_norm"] > 0.5  # the norm before clipping: this run needed the clip
    groups = trainer.optimizer.param_groups
    assert groups[0]["weight_decay"] == pytest.approx(rows[-1]["weight_decay"])
    assert groups[1]["weight_decay"] == 0.0
    # The clip itself: gradients of norm 10 come back with norm 0.5, and 10 is reported.
    params = [p for p in trainer.accelerator.unwrap_model(trainer.method).student.parameters()
              if p.requires_grad]
    for p in params:
        p.grad = torch.ones_like(p)
    norm = math.sqrt(sum(p.numel() for p in params))
    with torch.no_grad():
        for p in params:
            p.grad.mul_(10.0 / norm)
    reported = trainer._clip_gradients()
    # (fp32 norms over 11M elements agree to ~1e-3)
    assert reported is not None and float(reported) == pytest.approx(10.0, rel=1e-2)
    after = torch.stack([torch.linalg.vector_norm(p.grad) for p in params])
    assert float(torch.linalg.vector_norm(after)) == pytest.approx(0.5, rel=1e-2)


def test_teacher_follows_momentum(tmp_path: Path) -> None:
    """momentum 0: the teacher is the student after every step; momentum 1: it never moves."""
    trainer, _ = run(tmp_path / "a", "method.momentum=0.0", "method.momentum_end=0.0")
    model = trainer.accelerator.unwrap_model(trainer.method)
    for t, s in zip(model.teacher.parameters(), model.student_for_ema().parameters()):
        assert torch.equal(t, s)

    trainer, _ = run(tmp_path / "b", "method.momentum=1.0", "method.momentum_end=1.0")
    model = trainer.accelerator.unwrap_model(trainer.method)
    cfg = trainer.cfg
    torch.manual_seed(cfg.run.seed)  # rebuild the initial weights the same way
    from accelerate.utils import set_seed

    from ssl_ema.methods import build_method

    set_seed(cfg.run.seed)
    fresh = build_method(cfg, in_chans=1)
    moved = [not torch.equal(a, b) for a, b in
             zip(model.student_for_ema().parameters(), fresh.student_for_ema().parameters())]
    assert any(moved)  # the student trained
    for t, f in zip(model.teacher.parameters(), fresh.teacher.parameters()):
        assert torch.equal(t, f)  # the teacher did not


@pytest.mark.parametrize(("method", "workers"), [("byol", 0), ("dino", 2)])
def test_resume_is_bitwise_exact(tmp_path: Path, method: str, workers: int) -> None:
    """Resume mid-epoch == the uninterrupted run, bit for bit on CPU: student, teacher, buffers
    (BN statistics, DINO's centre), optimizer state, counters, data order and augmentations
    (seeded per sample, so loader workers and Accelerate's one-batch look-ahead do not matter)."""
    steps = ["train.max_steps=0", "train.epochs=2", "train.batch_size=256",
             "train.grad_accumulation=1", "train.checkpoint_every=3", "train.keep_checkpoints=5",
             f"method.name={method}", f"data.num_workers={workers}", *METHOD_TINY[method]]
    full, _ = run(tmp_path / "full", *steps)  # 1437 // 256 = 5 steps per epoch -> 10 steps
    assert full.state.step == 10
    run_dir = tmp_path / "full" / "run"
    resumed = resume_from(full, run_dir, 3)  # mid-epoch 0
    assert resumed.state.state_dict() == full.state.state_dict()
    # The floor measured before training (random weights, BN recomputed) comes back from the
    # checkpoint instead of being lost or recomputed on trained weights.
    assert resumed.evaluation.state_dict() == full.evaluation.state_dict()
    assert 0.0 < full.evaluation.state_dict()["knn_random_bn"] <= 1.0
    assert resumed.ema.num_updates == full.ema.num_updates == 10
    oa, ob = resumed.optimizer.state_dict()["state"], full.optimizer.state_dict()["state"]
    for k in ob:
        for key, value in ob[k].items():
            assert torch.equal(oa[k][key], value), (k, key)
