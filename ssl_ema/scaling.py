"""Batch-size scaling of hyperparameters.

Every batch-size-dependent value is stated as a base value at a reference batch and resolved once
for kappa = effective batch / reference batch; the base is never overwritten and both are logged.

Optimizer learning-rate rules: SGD and LARS scale linearly (Goyal et al. 2017); Adam-type
optimizers follow the square-root rule (Malladi et al. 2022).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ScaledValue:
    """A hyperparameter resolved for a batch size: base at the reference batch, kappa, effective."""

    name: str
    base: float
    kappa: float
    value: float

    def describe(self) -> str:
        return f"{self.name}: base {self.base:g} x rule(kappa={self.kappa:g}) = {self.value:g}"


def kappa(batch_size: int, reference_batch: int) -> float:
    """Scale factor kappa = batch / reference batch."""
    return batch_size / reference_batch


def scale_lr(base_lr: float, optimizer: str, k: float) -> ScaledValue:
    """Learning rate for kappa ``k``: linear for SGD/LARS, square root for Adam/AdamW."""
    if optimizer in ("sgd", "lars"):
        value = base_lr * k
    elif optimizer in ("adam", "adamw"):
        value = base_lr * math.sqrt(k)
    else:
        raise ValueError(f"unknown optimizer '{optimizer}'; valid: sgd, lars, adam, adamw")
    return ScaledValue("lr", base_lr, k, value)
