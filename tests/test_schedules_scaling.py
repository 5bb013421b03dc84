from __future__ import annotations

import math

import pytest

from ssl_ema.scaling import kappa, scale_lr
from ssl_ema.schedules import cosine, warmup_cosine


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


def test_learning_rate_rules() -> None:
    k = kappa(1024, 256)
    assert k == 4.0
    assert scale_lr(0.1, "sgd", k).value == pytest.approx(0.4)
    assert scale_lr(0.1, "lars", k).value == pytest.approx(0.4)
    assert scale_lr(1e-3, "adamw", k).value == pytest.approx(2e-3)
    assert scale_lr(0.1, "sgd", 0.5).value == pytest.approx(0.05)
    assert math.isclose(scale_lr(1e-3, "adamw", 0.25).value, 5e-4)
    with pytest.raises(ValueError, match="valid: sgd"):
        scale_lr(0.1, "rmsprop", 1.0)
