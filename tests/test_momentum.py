"""The EMA Scaling Rule's one owner (`ssl_ema.momentum`): its parts, and every EMA through it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ssl_ema.config import load_config
from ssl_ema.engine.scaled import resolve
from ssl_ema.engine.trainer import Trainer
from ssl_ema.momentum import Momentum, MomentumRule, update_momentum
from ssl_ema.scaling import scale_batchnorm_momentum, scale_momentum
from tests.helpers import METHOD_TINY, TINY


def test_per_update_returns_the_parts_the_log_prints() -> None:
    rule = MomentumRule.resolve(2.0, "ema", period=3, warmup=True, reference_batch=16)
    # t = 32 / 16 = 2 reference steps: warm-up min(0.99, 3 / 12) = 0.25, then ** (2 * 3).
    assert rule.per_update(0.99, 32) == Momentum(0.99, 0.25, 6.0, 0.25**6)
    late = rule.per_update(0.99, 16 * 10_000)
    assert late.warmed_up == 0.99 and late.value == 0.99**6
    assert late.value == update_momentum(0.99, kappa=2.0, period=3, warmup_t=10_000)
    # Rules other than "ema" leave kappa at 1 but keep the period's power.
    assert MomentumRule.resolve(2.0, "optimizer", period=3).per_update(0.99, 0).value == 0.99**3


def test_per_forward_and_batchnorm_at_accumulation_two() -> None:
    """At the reference batch in 2 micro-batches each forward sees half the reference batch, so
    its EMAs step with rho ** (1 / 2): BatchNorm's m = 1 - 0.9 ** 0.5 = 0.0513, not 0.1."""
    rule = MomentumRule.resolve(1.0, "ema", grad_accumulation=2)
    assert rule.forward_exponent == 0.5
    assert rule.per_forward(0.9).value == pytest.approx(0.9**0.5)
    assert rule.batchnorm() == pytest.approx(0.0513, abs=1e-4)
    assert MomentumRule.resolve(1.0, "none", grad_accumulation=2).batchnorm() == \
        pytest.approx(0.1)


def test_the_public_scaling_helpers_are_the_same_rule() -> None:
    rule = MomentumRule.resolve(4.0, "ema")
    assert scale_momentum(0.996, 4.0).value == rule.per_update(0.996, 0).value
    bn = torch.nn.BatchNorm1d(3)
    assert scale_batchnorm_momentum(bn, 4.0) == rule.batchnorm() == bn.momentum
    with pytest.raises(ValueError, match="must lie in"):
        rule.per_forward(1.5)


def _spy(monkeypatch: pytest.MonkeyPatch, name: str, calls: list[tuple[Any, ...]]) -> None:
    original: Callable[..., Any] = getattr(MomentumRule, name)

    def spy(self: MomentumRule, *args: Any) -> Any:
        result = original(self, *args)
        calls.append((*args, result))
        return result

    monkeypatch.setattr(MomentumRule, name, spy)


@pytest.mark.slow  # a 2-step DINO run through the real trainer
def test_every_ema_goes_through_the_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Teacher, extra EMAs, BatchNorm statistics and DINO's centre: each momentum the run uses
    comes from `MomentumRule`, at kappa 2 with 2 micro-batches per step."""
    updates: list[tuple[Any, ...]] = []
    forwards: list[tuple[Any, ...]] = []
    norms: list[tuple[Any, ...]] = []
    _spy(monkeypatch, "per_update", updates)
    _spy(monkeypatch, "per_forward", forwards)
    _spy(monkeypatch, "batchnorm", norms)
    cfg = load_config(None, [*TINY, *METHOD_TINY["dino"], "method.name=dino",
                             f"run.output_dir={tmp_path}", "scaling.reference_batch=8",
                             "ema.extra_momenta=[0.9]", "ema.warmup=true", "train.max_steps=2",
                             "dino.center_momentum=0.8"])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.fit()
    rule = resolve(cfg, 16).momentum
    assert rule.kappa == 2.0 and rule.forward_exponent == 1.0 and cfg.train.grad_accumulation == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    train = [r for r in rows if r["event"] == "train"]
    # teacher then extra EMA, once per optimizer step; the log prints the teacher's parts
    assert [u[0] for u in updates] == [train[0]["momentum_base"], 0.9,
                                       train[1]["momentum_base"], 0.9]
    assert [r["momentum"] for r in train] == [updates[0][-1].value, updates[2][-1].value]
    # DINO's centre: per forward, 2 micro-batches x 2 steps (and the evaluations' none)
    assert [f[0] for f in forwards if f[0] == 0.8] == [0.8] * 4
    assert trainer.model.criterion.center_momentum == forwards[-1][-1].value
    # BatchNorm statistics: set from the rule at the epoch's start
    bn_value = norms[-1][-1]
    assert bn_value == pytest.approx(0.1)
    assert [m.momentum for m in trainer.model.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)][0] == bn_value
