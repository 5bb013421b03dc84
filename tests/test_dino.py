"""DINO: loss against the official formula, centre scaling, temperature warm-up, freezing, views."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssl_ema.config import load_config
from ssl_ema.engine.loaders import build_run_data
from ssl_ema.methods.dino import DINO
from ssl_ema.momentum import MomentumRule
from tests.helpers import poison_freed_memory

SMALL = ["method.name=dino", "data.image_size=16", "dino.local_size=8", "dino.local_views=2",
         "dino.output_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16",
         "model.backbone=resnet10t", "model.cifar_stem=false", "train.epochs=10",
         "dino.warmup_teacher_temp=0.04", "dino.teacher_temp=0.07",
         "dino.warmup_teacher_temp_epochs=4", "dino.freeze_last_layer_epochs=1"]


def dino(*extra: str) -> DINO:
    torch.manual_seed(0)
    model = DINO(load_config(None, [*SMALL, *extra]), in_chans=1)
    return model


def official_dino_loss(teacher: list[torch.Tensor], student: list[torch.Tensor],
                       center: torch.Tensor, t_temp: float, s_temp: float) -> torch.Tensor:
    """The loop of DINOLoss.forward in facebookresearch/dino (main_dino.py), written out."""
    total, n = torch.zeros(()), 0
    for iq, t in enumerate(teacher):
        q = F.softmax((t - center) / t_temp, dim=-1)
        for v, s in enumerate(student):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(s / s_temp, dim=-1), dim=-1).mean()
            n += 1
    return total / n


def test_loss_matches_the_official_formula() -> None:
    model = dino()
    torch.manual_seed(1)
    teacher = [torch.randn(5, 64) for _ in range(2)]
    student = [torch.randn(5, 64) for _ in range(4)]  # 2 global + 2 local
    center = 0.3 * torch.randn(1, 64)
    model.criterion.center.copy_(center[None])
    expected = official_dino_loss(teacher, student, center, 0.05, 0.1)
    loss = model.criterion(teacher, student, teacher_temp=0.05)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # Identical sharp teacher and student on one class: the loss is (near) its minimum 0.
    one_hot = torch.zeros(3, 64)
    one_hot[:, 7] = 100.0
    model.criterion.center.zero_()
    low = model.criterion([one_hot, one_hot], [one_hot, one_hot], teacher_temp=0.04)
    assert low.item() == pytest.approx(0.0, abs=1e-6)


def test_center_momentum_follows_the_scaling_rule() -> None:
    """One centre step at kappa 4 with 2 micro-batches (per-forward exponent 2) == two steps at
    the base momentum (0.9)."""
    torch.manual_seed(2)
    teacher = [torch.randn(6, 64) + 1.0 for _ in range(2)]
    student = [torch.randn(6, 64) for _ in range(2)]
    a, b = dino(), dino()
    a.prepare_step(0.5, MomentumRule.resolve(4.0, "ema", grad_accumulation=2))
    assert a.criterion.center_momentum == pytest.approx(0.81)
    a.criterion(teacher, student, teacher_temp=0.07)
    b.prepare_step(0.5, MomentumRule.resolve(4.0, "optimizer"))
    for _ in range(2):
        b.criterion(teacher, student, teacher_temp=0.07)
    torch.testing.assert_close(a.criterion.center, b.criterion.center)
    batch_mean = torch.stack(teacher).mean(dim=(0, 1))
    torch.testing.assert_close(a.criterion.center[0, 0], (1 - 0.81) * batch_mean)


def test_teacher_temperature_warmup_and_momentum_schedule() -> None:
    model = dino("method.momentum=0.996")
    # 4 of 10 epochs: 0.04 -> 0.07 linearly over progress [0, 0.4], then constant.
    temps = [model.teacher_temperature(p) for p in (0.0, 0.2, 0.4, 0.9)]
    assert temps == pytest.approx([0.04, 0.055, 0.07, 0.07])
    assert model.momentum(0.0) == pytest.approx(0.996) and model.momentum(1.0) == 1.0


def test_last_layer_frozen_for_the_first_epoch() -> None:
    model = dino()
    batch = (torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16), torch.randn(4, 1, 8, 8),
             torch.randn(4, 1, 8, 8), torch.zeros(4))
    last = list(model.student["head"].last_layer.parameters())
    for progress, frozen in ((0.05, True), (0.15, False)):  # freeze: 1 of 10 epochs
        model.zero_grad(set_to_none=True)
        model.prepare_step(progress, MomentumRule.resolve(1.0, "ema"))
        model(batch)["loss"].backward()
        model.before_optimizer_step()
        trainable = [p for p in last if p.requires_grad]
        assert trainable and all((p.grad is None) == frozen for p in trainable)
    # The teacher is a built copy loaded from the student, weight-normed last layer included.
    for t, s in zip(model.teacher.parameters(), model.student_for_ema().parameters()):
        assert t.shape == s.shape


def test_multicrop_views_of_digits() -> None:
    data = build_run_data(load_config(None, SMALL))
    *views, label = data.train[0]
    assert [tuple(v.shape) for v in views] == [(1, 16, 16)] * 2 + [(1, 8, 8)] * 2
    assert isinstance(label, int)


def bf16_views(batch: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 1, 16, 16, generator=g) for _ in range(2)] + \
        [torch.randn(batch, 1, 8, 8, generator=g) for _ in range(2)]


def test_the_loss_is_fp32_under_bf16_autocast() -> None:
    """The official code's loss (elementwise, fp32 under autocast) on the bf16 networks'
    outputs: lightly's einsum ran in bf16 (8 significant bits) under autocast."""
    model = dino("model.backbone=test_resnet")
    views = bf16_views(8, 0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        teacher = model._forward(model.teacher, views[:2])
        student = model._forward(model.student, views[:2]) + \
            model._forward(model.student, views[2:])
    assert teacher[0].dtype == torch.bfloat16  # the networks keep the recipe's precision
    expected = official_dino_loss([t.float() for t in teacher], [s.float() for s in student],
                                  model.criterion.center[0].clone(), 0.04, 0.1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model((*views, torch.zeros(8, dtype=torch.long)))["loss"]
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_bf16_training_steps_stay_finite() -> None:
    """Six SGD steps of a small DINO under CPU bf16 autocast, no gradient clipping: every
    loss and gradient finite. Issue 24's non-finite gradients were oneDNN's bf16 conv weight
    gradient on the 8 px crops' 1x1 maps at layer3 (uninitialised memory, torch 2.13-2.15;
    `ssl_ema.models.conv_guard`, docs/RESULTS.md): NaN left in freed memory before each
    backward makes that fault show whatever ran before (this test alone used to pass)."""
    model = dino("model.backbone=test_resnet", "dino.freeze_last_layer_epochs=0")
    opt = torch.optim.SGD(model.student.parameters(), lr=0.05, momentum=0.9)
    for step in range(6):
        model.prepare_step(step / 6, MomentumRule.resolve(1.0, "ema"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model((*bf16_views(16, step), torch.zeros(16, dtype=torch.long)))["loss"]
        poison_freed_memory()
        loss.backward()
        grads = [p.grad for p in model.student.parameters() if p.grad is not None]
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads), step
        opt.step()
        opt.zero_grad()
