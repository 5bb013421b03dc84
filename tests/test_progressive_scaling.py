"""The EMA Scaling Rule and progressive scaling inside the trainer (values from the logs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ssl_ema.engine.checkpoint import checkpoints
from ssl_ema.engine.tracking import read_metrics
from ssl_ema.engine.trainer import Trainer
from ssl_ema.schedules import warmup_cosine
from tests.helpers import run

pytestmark = pytest.mark.slow  # trains, or runs the tools, through the real trainer


def first_conv(backbone: nn.Module) -> torch.Tensor:
    return next(m.weight for m in backbone.modules() if isinstance(m, nn.Conv2d))


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["event"] == "train"]


@pytest.mark.parametrize("rule", ["ema", "optimizer"])
def test_kappa_two_scales_lr_momentum_and_batchnorm(tmp_path: Path, rule: str) -> None:
    trainer, _ = run(tmp_path, "train.batch_size=32", "train.grad_accumulation=1",
                     f"scaling.rule={rule}")
    hyper = trainer.hyper(0)
    assert hyper.kappa == 2.0 and hyper.optimizer.lr.value == pytest.approx(0.1)  # 0.05 x 2
    model = trainer.accelerator.unwrap_model(trainer.method)
    for row in train_rows(tmp_path / "run"):
        base = model.momentum((row["samples_seen"] - 32) / trainer.total_samples)
        assert row["momentum_base"] == pytest.approx(base)
        expected = base**2 if rule == "ema" else base
        assert row["momentum"] == pytest.approx(expected)
    bn = next(m for m in model.student.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn.momentum == pytest.approx(1 - 0.9**2 if rule == "ema" else 0.1)


def test_update_period_and_parallel_ema_copies(tmp_path: Path) -> None:
    trainer, result = run(tmp_path, "train.max_steps=4", "ema.period=2",
                          "ema.extra_momenta=[0.5, 0.99]", "ema.recompute_bn_batches=1")
    assert trainer.ema.num_updates == 2  # every 2nd of 4 steps
    rows = train_rows(tmp_path / "run")
    assert ["momentum" in r for r in rows] == [False, True, False, True]
    # One update every 2 steps uses the 2-step momentum.
    assert rows[1]["momentum"] == pytest.approx(rows[1]["momentum_base"] ** 2)
    assert {"knn_ema_0.5", "knn_ema_0.99"} <= set(result)
    model = trainer.accelerator.unwrap_model(trainer.method)
    fast, slow = (first_conv(c["backbone"]) for c in model.ema_copies)
    student = first_conv(model.student["backbone"])
    # The fast copy (0.5 ** 2 per update) is closer to the student than the slow one.
    assert (fast - student).norm() < (slow - student).norm()
    assert not torch.equal(fast, slow)


def test_batch_schedule_changes_steps_not_samples(tmp_path: Path) -> None:
    common = ["train.max_steps=0", "train.epochs=2", "train.batch_size=128",
              "train.grad_accumulation=1", "scaling.reference_batch=128", "optim.lr=0.1"]
    trainer, _ = run(tmp_path / "a", *common, "train.batch_schedule=[[1, 256]]",
                     "train.checkpoint_every=12")
    # digits: 1437 images -> 11 steps of 128, then 5 steps of 256.
    assert trainer.total_steps == 16 and trainer.state.step == 16
    assert trainer.state.samples_seen == 11 * 128 + 5 * 256 == trainer.total_samples
    rows = train_rows(tmp_path / "a" / "run")
    model = trainer.accelerator.unwrap_model(trainer.method)
    for row in rows:
        before = row["samples_seen"] - row["batch"]
        progress = before / trainer.total_samples
        k = row["batch"] / 128
        assert row["lr"] == pytest.approx(warmup_cosine(0.1 * k, progress, 0.0))
        assert row["momentum"] == pytest.approx(model.momentum(progress) ** k)
    assert [r["batch"] for r in rows] == [128] * 11 + [256] * 5

    # Resume from step 12 (inside the 256 phase) ends where the uninterrupted run ended.
    run_dir = tmp_path / "a" / "run"
    (ckpt,) = [c for c in checkpoints(run_dir) if c.name == "step_00000012"]
    resumed = Trainer(trainer.cfg, run_dir, ckpt)
    resumed.fit()
    assert resumed.state.step == 16 and resumed.state.samples_seen == trainer.state.samples_seen
    a = resumed.accelerator.unwrap_model(resumed.method)
    for pa, pb in zip(a.teacher.parameters(), model.teacher.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)
