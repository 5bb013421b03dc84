"""Short CPU training runs through the real trainer: values, not just "it runs"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ssl_ema.config import load_config
from ssl_ema.engine.checkpoint import checkpoints
from ssl_ema.engine.tracking import read_metrics
from ssl_ema.engine.trainer import Trainer
from ssl_ema.methods import METHODS

TINY = ["data.image_size=8", "data.num_workers=0", "data.eval_subset=64",
        "method.projection_hidden_dim=32", "method.projection_dim=16",
        "method.prediction_hidden_dim=32", "optim.name=sgd", "optim.lr=0.05",
        "optim.warmup_epochs=0", "train.batch_size=16", "train.grad_accumulation=2",
        "train.epochs=1", "train.max_steps=3", "train.log_every=1", "eval.every_epochs=0",
        "scaling.reference_batch=16",
        "eval.knn_k=5"]


def run(tmp_path: Path, *extra: str) -> tuple[Trainer, dict[str, float]]:
    cfg = load_config(None, [*TINY, f"run.output_dir={tmp_path}", *extra])
    trainer = Trainer(cfg, tmp_path / "run")
    return trainer, trainer.fit()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_three_steps_with_accumulation(tmp_path: Path, method: str) -> None:
    trainer, result = run(tmp_path, f"method.name={method}")
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


def test_resume_continues_the_same_run(tmp_path: Path) -> None:
    steps = ["train.max_steps=0", "train.epochs=2", "train.batch_size=256",
             "train.grad_accumulation=1", "train.checkpoint_every=5"]
    full, _ = run(tmp_path / "full", *steps)  # 1437 // 256 = 5 steps per epoch -> 10 steps
    assert full.state.step == 10
    run_dir = tmp_path / "full" / "run"
    first = checkpoints(run_dir)[0]
    assert first.name == "step_00000005"
    resumed = Trainer(full.cfg, run_dir, first)
    resumed.fit()
    assert resumed.state.step == 10 and resumed.state.samples_seen == full.state.samples_seen
    a = resumed.accelerator.unwrap_model(resumed.method)
    b = full.accelerator.unwrap_model(full.method)
    for (name, pa), pb in zip(a.teacher.named_parameters(), b.teacher.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=name)
