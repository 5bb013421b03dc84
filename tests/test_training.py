"""Short CPU training runs through the real trainer: values, not just "it runs"."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ssl_ema.config import load_config
from ssl_ema.engine.checkpoint import checkpoints
from ssl_ema.engine.tracking import read_metrics
from ssl_ema.engine.trainer import Trainer
from ssl_ema.methods import METHODS

pytestmark = pytest.mark.slow  # trains, or runs the tools, through the real trainer

# timm's test_resnet (0.37 M parameters): what these runs check does not depend on the
# backbone's size, and ResNet-18 made them most of the suite's time.
TINY = ["data.image_size=8", "data.num_workers=0", "data.eval_subset=64",
        "model.backbone=test_resnet", "model.cifar_stem=false",
        "byol.projection_hidden_dim=32", "byol.projection_dim=16",
        "byol.prediction_hidden_dim=32", "optim.name=sgd", "optim.lr=0.05",
        "optim.warmup_epochs=0", "train.batch_size=16", "train.grad_accumulation=2",
        "train.epochs=1", "train.max_steps=3", "train.log_every=1", "eval.every_epochs=0",
        "scaling.reference_batch=16",
        "eval.knn_k=5"]


# Per method: small heads and views for the 8 px smoke runs (`MethodSpec.tiny_overrides`).
METHOD_TINY = {name: list(spec.tiny_overrides) for name, spec in METHODS.items()}
# The generic smoke run covers every registered self-supervised method; the classification
# methods (labels, splits) have their own runs in test_classification.py.
SELF_SUPERVISED = sorted(name for name, spec in METHODS.items() if spec.labels == "none")


def run(tmp_path: Path, *extra: str) -> tuple[Trainer, dict[str, float]]:
    cfg = load_config(None, [*TINY, f"run.output_dir={tmp_path}", *extra])
    trainer = Trainer(cfg, tmp_path / "run")
    return trainer, trainer.fit()


def resume_from(full: Trainer, run_dir: Path, step: int) -> Trainer:
    """Resume ``full``'s run from its checkpoint at ``step``, train to the end, and check that
    every tensor of the method (student, teachers, heads, buffers) equals the uninterrupted
    run's, bit for bit; return the resumed trainer for further checks."""
    ckpt = {c.name: c for c in checkpoints(run_dir)}[f"step_{step:08d}"]
    resumed = Trainer(full.cfg, run_dir, ckpt)
    resumed.fit()
    a = resumed.accelerator.unwrap_model(resumed.method).state_dict()
    b = full.accelerator.unwrap_model(full.method).state_dict()
    assert a.keys() == b.keys()
    for name in b:
        assert torch.equal(a[name], b[name]), name
    return resumed


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
