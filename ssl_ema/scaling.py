"""The EMA Scaling Rule and the optimizer scaling rules.

Every batch-size-dependent hyperparameter is stated as a base value at a reference batch and
resolved once for kappa = batch / reference batch; the base is never overwritten, and base, kappa
and effective value are logged (DINOv2 logs base and scaled lr; airbench states hyperparameters
per 1024 examples).

- EMA Scaling Rule (Busbridge et al., "How to Scale Your EMA", NeurIPS 2023, Def. 1.2): when
  the batch grows by kappa, every EMA momentum rho becomes rho ** kappa (model EMA / teacher,
  DINO centre, BatchNorm running statistics). Derived from an SDE view: it keeps the dynamics as
  a function of samples seen unchanged, also when the EMA feeds back into training.
  `ssl_ema.momentum` owns it (schedule, warm-up, period, kappa); `scale_momentum` names a scaled
  momentum for logs and recipes.
- SGD and LARS: lr * kappa (Goyal et al. 2017).
- Adam and AdamW: square-root rule (Malladi et al., "On the SDEs and Scaling Rules for Adaptive
  Gradient Algorithms", NeurIPS 2022): lr * sqrt(kappa), beta -> 1 - kappa (1 - beta),
  eps / sqrt(kappa).

Rules: ``ema`` applies both the EMA and the optimizer rule (the default); ``optimizer`` scales
only the optimizer (the common practice the paper shows breaks EMA-based methods); ``none``
scales nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from ssl_ema.momentum import ScalingRule, batchnorm_momentum, ema_kappa, scaled_momentum

RULES: tuple[str, ...] = ("ema", "optimizer", "none")
OPTIMIZERS: tuple[str, ...] = ("sgd", "lars", "adam", "adamw")


@dataclass(frozen=True)
class ScaledValue:
    """A hyperparameter resolved for a batch size: base at the reference batch, kappa, effective."""

    name: str
    base: float
    kappa: float
    value: float

    def describe(self) -> str:
        return f"{self.name}: base {self.base:g} @kappa {self.kappa:g} -> {self.value:g}"


def kappa(batch_size: int, reference_batch: int) -> float:
    """Scale factor kappa = batch / reference batch."""
    if batch_size <= 0 or reference_batch <= 0:
        raise ValueError(f"batch sizes must be positive, got {batch_size} and {reference_batch}")
    return batch_size / reference_batch


def scale_momentum(base: float, k: float, name: str = "momentum") -> ScaledValue:
    """EMA Scaling Rule: rho -> rho ** kappa (one update at kappa x batch = kappa updates);
    `ssl_ema.momentum` holds the rule, this names the value for logs and recipes."""
    return ScaledValue(name, base, k, scaled_momentum(base, k, name))


@dataclass(frozen=True)
class OptimizerHyperparams:
    """Optimizer values after scaling; ``betas``/``eps`` are only meaningful for Adam-type."""

    lr: ScaledValue
    betas: tuple[ScaledValue, ScaledValue] | None = None
    eps: ScaledValue | None = None

    def describe(self) -> list[str]:
        extra = [*(self.betas or ()), *([self.eps] if self.eps else [])]
        return [v.describe() for v in (self.lr, *extra)]


def scale_optimizer(optimizer: str, k: float, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8, rule: ScalingRule = "ema") -> OptimizerHyperparams:
    """Resolve the optimizer's lr (and Adam's betas and eps) for ``kappa`` under ``rule``."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{optimizer}'; valid: {', '.join(OPTIMIZERS)}")
    if rule not in RULES:
        raise ValueError(f"unknown scaling rule '{rule}'; valid: {', '.join(RULES)}")
    s = 1.0 if rule == "none" else k
    if optimizer in ("sgd", "lars"):
        return OptimizerHyperparams(ScaledValue("lr", lr, k, lr * s))
    scaled_betas = []
    for i, beta in enumerate(betas):
        value = 1.0 - s * (1.0 - beta)
        if value <= 0.0:
            raise ValueError(
                f"Adam beta{i + 1}={beta} at kappa={k:g} gives 1 - kappa(1 - beta) = {value:g} "
                "<= 0; the square-root rule does not reach that far: lower the batch or raise beta"
            )
        scaled_betas.append(ScaledValue(f"beta{i + 1}", beta, k, value))
    return OptimizerHyperparams(
        ScaledValue("lr", lr, k, lr * math.sqrt(s)),
        (scaled_betas[0], scaled_betas[1]),
        ScaledValue("eps", eps, k, eps / math.sqrt(s)),
    )


def batchnorm_layers(module: nn.Module) -> Iterable[nn.modules.batchnorm._BatchNorm]:
    return (m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def set_batchnorm_momentum(module: nn.Module, value: float) -> None:
    """Set every BatchNorm's running-statistics momentum; layers with ``momentum=None``
    (cumulative average) are left alone."""
    for bn in batchnorm_layers(module):
        if bn.momentum is not None:
            bn.momentum = value


def scale_batchnorm_momentum(module: nn.Module, k: float, base: float = 0.1) -> float:
    """Set every BatchNorm's running-statistics momentum for kappa; returns the new value,
    1 - (1 - base) ** kappa (`ssl_ema.momentum.batchnorm_momentum`)."""
    value = batchnorm_momentum(base, k)
    set_batchnorm_momentum(module, value)
    return value


__all__ = ["RULES", "OPTIMIZERS", "OptimizerHyperparams", "ScaledValue", "ScalingRule",
           "batchnorm_layers", "ema_kappa", "kappa", "scale_batchnorm_momentum", "scale_momentum",
           "scale_optimizer", "set_batchnorm_momentum"]
