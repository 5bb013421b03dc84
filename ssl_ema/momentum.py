"""The EMA Scaling Rule, in one place: how a base momentum becomes the momentum of one update.

Every momentum in a recipe is stated *per step at the reference batch* (``scaling.reference_batch``)
and every EMA of the package goes through :class:`MomentumRule`:

- teacher and extra EMAs (``method.momentum`` -> ``method.momentum_end``, ``ema.extra_momenta``),
  updated once per optimizer step, every ``ema.period`` steps: schedule (cosine, BYOL, Grill et
  al. 2020, Sec. 3.2) -> warm-up ``min(rho, (t + 1) / (t + 10))`` (Morales-Brotons et al. 2024,
  Sec. 3) -> ``** (kappa * period)`` (:meth:`MomentumRule.per_update`);
- EMAs stepped once per forward pass (BatchNorm running statistics, DINO's centre): a forward
  sees ``batch / grad_accumulation`` samples, so ``** (kappa / grad_accumulation)``
  (:meth:`MomentumRule.per_forward`, :meth:`MomentumRule.batchnorm`).

The power is the EMA Scaling Rule (Busbridge et al., "How to Scale Your EMA", NeurIPS 2023,
Def. 1.2): one update at kappa times the batch replaces kappa updates, rho -> rho ** kappa; an
update every T steps replaces T of them, rho -> rho ** T. Both keep the averaging horizon fixed in
samples. Under ``scaling.rule`` other than ``ema`` kappa is taken as 1 (the momenta are not scaled)
but the period still is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ssl_ema.schedules import cosine

ScalingRule = Literal["ema", "optimizer", "none"]
BATCHNORM_MOMENTUM = 0.1  # PyTorch's default, taken as stated at the reference batch


def scheduled_momentum(start: float, end: float, progress: float) -> float:
    """Half-cosine from ``start`` (progress 0) to ``end`` (progress 1), clamped outside [0, 1];
    progress is the fraction of samples seen (BYOL, Grill et al. 2020, Sec. 3.2)."""
    return cosine(start, end, progress)


def warmup_momentum(momentum: float, t: float) -> float:
    """Momentum warm-up min(rho, (t + 1) / (t + 10)) (Morales-Brotons et al. 2024, Sec. 3).

    ``t`` counts optimizer steps at the reference batch (samples seen / reference batch), so the
    warm-up, like the horizon, is fixed in samples whatever the batch and the update period.
    """
    return min(momentum, (t + 1.0) / (t + 10.0))


def scaled_momentum(momentum: float, exponent: float, name: str = "momentum") -> float:
    """rho ** exponent, the one place a momentum is raised to the EMA Scaling Rule's power."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {momentum}")
    return momentum**exponent


def batchnorm_momentum(base: float, exponent: float) -> float:
    """PyTorch's BatchNorm ``momentum`` m is 1 - rho of the running statistics' EMA
    (running <- (1 - m) running + m batch statistic): m -> 1 - (1 - m) ** exponent."""
    return 1.0 - scaled_momentum(1.0 - base, exponent, "BatchNorm momentum's 1 - m")


def update_momentum(momentum: float, *, kappa: float = 1.0, period: int = 1,
                    warmup_t: float | None = None) -> float:
    """Momentum of one update from a per-step momentum at the reference batch.

    One update every ``period`` steps at ``kappa`` times the reference batch replaces
    ``kappa * period`` reference steps: rho -> rho ** (kappa * period).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    if period < 1 or kappa <= 0:
        raise ValueError(f"period must be >= 1 and kappa > 0, got {period} and {kappa}")
    if warmup_t is not None:
        momentum = warmup_momentum(momentum, warmup_t)
    return scaled_momentum(momentum, kappa * period)


def ema_kappa(k: float, rule: ScalingRule) -> float:
    """The exponent applied to EMA momenta: kappa under the EMA rule, else 1 (unscaled)."""
    return k if rule == "ema" else 1.0


@dataclass(frozen=True)
class Momentum:
    """The momentum of one EMA update with its parts (metrics.jsonl logs ``base`` as
    ``momentum_base`` and ``value`` as ``momentum``)."""

    base: float  # per step at the reference batch, from the schedule
    warmed_up: float  # after the warm-up (= base without it)
    exponent: float  # kappa * period per update, kappa / grad_accumulation per forward
    value: float  # warmed_up ** exponent: the momentum this update uses


@dataclass(frozen=True)
class MomentumRule:
    """The EMA Scaling Rule at one batch size; `ssl_ema.engine.scaled.resolve` builds one per
    batch of ``train.batch_schedule``."""

    kappa: float  # the EMA exponent: batch / reference batch under rule "ema", else 1
    period: int  # ema.period: one teacher update every `period` optimizer steps
    warmup: bool  # ema.warmup
    reference_batch: int
    # EMAs stepped once per forward pass see batch / grad_accumulation samples per step (over
    # all processes): this exponent keeps their horizon in samples (1 unless rule "ema").
    forward_exponent: float = 1.0

    @classmethod
    def resolve(cls, k: float, rule: ScalingRule, *, period: int = 1, warmup: bool = False,
                reference_batch: int = 1, grad_accumulation: int = 1) -> MomentumRule:
        """The rule at kappa = batch / reference batch under ``scaling.rule``."""
        forward = k / grad_accumulation if rule == "ema" else 1.0
        return cls(ema_kappa(k, rule), period, warmup, reference_batch, forward)

    @property
    def update_exponent(self) -> float:
        """One update every ``period`` steps at kappa x the reference batch: kappa * period."""
        return self.kappa * self.period

    def per_update(self, base: float, samples_seen: int) -> Momentum:
        """Teacher or extra EMA: the momentum of one update after ``samples_seen`` samples."""
        if self.warmup:
            warmed = warmup_momentum(base, samples_seen / self.reference_batch)
        else:
            warmed = base
        exponent = self.update_exponent
        value = update_momentum(warmed, kappa=self.kappa, period=self.period)
        return Momentum(base, warmed, exponent, value)

    def per_forward(self, base: float) -> Momentum:
        """An EMA stepped once per forward pass (DINO's centre), no warm-up."""
        exponent = self.forward_exponent
        return Momentum(base, base, exponent, scaled_momentum(base, exponent))

    def batchnorm(self, base: float = BATCHNORM_MOMENTUM) -> float:
        """BatchNorm's running statistics, an EMA stepped per forward (in PyTorch's convention,
        see :func:`batchnorm_momentum`)."""
        return batchnorm_momentum(base, self.forward_exponent)
