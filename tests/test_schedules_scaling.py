from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ssl_ema.engine.header import coverage_note
from ssl_ema.scaling import (
    ema_kappa,
    kappa,
    scale_batchnorm_momentum,
    scale_momentum,
    scale_optimizer,
)
from ssl_ema.schedules import batch_at_epoch, cosine, warmup_cosine


def test_cosine_endpoints_and_midpoint() -> None:
    assert cosine(0.99, 1.0, 0.0) == 0.99
    assert cosine(0.99, 1.0, 1.0) == 1.0
    assert cosine(0.99, 1.0, 0.5) == pytest.approx(0.995)
    assert cosine(0.99, 1.0, 2.0) == 1.0  # clamped


def test_warmup_then_cosine() -> None:
    assert warmup_cosine(1.0, 0.05, warmup=0.1) == pytest.approx(0.5)
    assert warmup_cosine(1.0, 0.1, warmup=0.1) == pytest.approx(1.0)
    assert warmup_cosine(1.0, 0.55, warmup=0.1) == pytest.approx(0.5)
    assert warmup_cosine(1.0, 1.0, warmup=0.1, end=0.1) == pytest.approx(0.1)


def test_optimizer_rules() -> None:
    k = kappa(1024, 256)
    assert k == 4.0
    assert scale_optimizer("sgd", k, lr=0.1).lr.value == pytest.approx(0.4)
    assert scale_optimizer("lars", k, lr=0.1).lr.value == pytest.approx(0.4)
    assert scale_optimizer("sgd", 0.5, lr=0.1).lr.value == pytest.approx(0.05)
    # Adam square-root rule (Malladi et al. 2022): lr x sqrt(k), 1 - k(1 - beta), eps / sqrt(k).
    adam = scale_optimizer("adamw", k, lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    assert adam.lr.value == pytest.approx(2e-3)
    assert adam.betas is not None and adam.eps is not None
    assert (adam.betas[0].value, adam.betas[1].value) == pytest.approx((0.6, 0.996))
    assert adam.eps.value == pytest.approx(5e-9)
    assert adam.betas[0].base == 0.9 and adam.lr.base == 1e-3 and adam.lr.kappa == 4.0
    assert math.isclose(scale_optimizer("adam", 0.25, lr=1e-3).lr.value, 5e-4)
    # rule none: nothing moves; the optimizer rule scales lr like the EMA rule does.
    none = scale_optimizer("adamw", k, lr=1e-3, rule="none")
    assert none.lr.value == 1e-3 and none.betas is not None and none.betas[0].value == 0.9
    assert scale_optimizer("sgd", k, lr=0.1, rule="optimizer").lr.value == pytest.approx(0.4)
    with pytest.raises(ValueError, match="valid: sgd"):
        scale_optimizer("rmsprop", 1.0, lr=0.1)
    with pytest.raises(ValueError, match="beta1=0.9 at kappa=16"):
        scale_optimizer("adamw", 16, lr=1e-3)  # 1 - 16 x 0.1 < 0


def test_ema_rule() -> None:
    assert scale_momentum(0.99, 4).value == pytest.approx(0.99**4)
    assert scale_momentum(0.996, 0.5).value == pytest.approx(math.sqrt(0.996))
    assert ema_kappa(4, "ema") == 4 and ema_kappa(4, "optimizer") == 1 and ema_kappa(4, "none") == 1
    with pytest.raises(ValueError, match="must lie in"):
        scale_momentum(1.2, 2)


def test_batchnorm_momentum_follows_the_rule() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.BatchNorm1d(2, momentum=None))
    value = scale_batchnorm_momentum(model, 4)
    assert value == pytest.approx(1 - 0.9**4)
    assert model[1].momentum == pytest.approx(1 - 0.9**4) and model[2].momentum is None
    # Equivalence on a constant batch statistic: one scaled step == kappa steps of the base.
    x = torch.randn(64, 2)
    one, many = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    scale_batchnorm_momentum(one, 4)
    one(x)
    for _ in range(4):
        many(x)
    torch.testing.assert_close(one.running_mean, many.running_mean)
    torch.testing.assert_close(one.running_var, many.running_var)


def test_batch_schedule_by_epoch() -> None:
    schedule = ((10, 512), (20, 1024))
    assert [batch_at_epoch(e, 256, schedule) for e in (0, 9, 10, 19, 20, 99)] == \
        [256, 256, 512, 512, 1024, 1024]
    assert batch_at_epoch(5, 256, ()) == 256


def test_a_batch_that_covers_less_of_an_epoch_is_told() -> None:
    """pseudo-label-cpu as first sized: 2,285 groups of one labelled and 7 unlabelled images;
    batch 256 covers 8 x 256 of them an epoch, the reference 64 would cover 35 x 64."""
    note = coverage_note(2285, {256: 2048}, 64)
    assert note is not None and note.startswith("warning: an epoch covers 2,240 of 2,285")
    assert "2,048 at batch 256" in note and "differ by up to 8.6%" in note
    assert coverage_note(2560, {64: 2560, 256: 2560}, 64) is None  # the study as it runs
    assert coverage_note(20000, {512: 19968}, 32) is None  # within 1%: scaling-cifar-cpu
    assert coverage_note(1437, {16: 1424, 256: 1280}, 16) is not None  # scaling-cpu, kappa 16
