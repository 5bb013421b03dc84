"""The hyperparameters of one batch size: the recipe's base values resolved for kappa.

Resolved once per batch size (and again at each switch of a batch schedule), applied to the
optimizer's parameter groups and the BatchNorm layers, and logged as base, kappa, effective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ssl_ema.config import Config
from ssl_ema.ema import update_momentum
from ssl_ema.scaling import (
    OptimizerHyperparams,
    ema_kappa,
    kappa,
    scale_batchnorm_momentum,
    scale_optimizer,
)

BATCHNORM_BASE_MOMENTUM = 0.1  # PyTorch's default, taken as stated at the reference batch


@dataclass(frozen=True)
class ScaledHyperparams:
    batch: int
    kappa: float
    optimizer: OptimizerHyperparams
    ema_exponent: float  # momenta are raised to this power (kappa under the EMA rule, else 1)
    period: int
    warmup: bool
    reference_batch: int
    # EMAs that step once per forward pass (BatchNorm statistics, DINO's centre) see
    # batch / grad_accumulation samples per step (over all processes); at the reference that is
    # the reference batch. This exponent keeps their horizon in samples (1 unless rule "ema").
    forward_exponent: float
    scale_batchnorm: bool

    def update_momentum(self, momentum: float, samples_seen: int) -> float:
        """Per-step momentum at the reference batch -> momentum of one EMA update now."""
        t = samples_seen / self.reference_batch if self.warmup else None
        return update_momentum(momentum, kappa=self.ema_exponent, period=self.period, warmup_t=t)

    def apply(self, optimizer: torch.optim.Optimizer, modules: list[nn.Module]) -> None:
        """Set the scaled Adam betas/eps on the optimizer and the BatchNorm momenta."""
        opt = self.optimizer
        for group in optimizer.param_groups:
            if opt.betas is not None and "betas" in group:
                group["betas"] = (opt.betas[0].value, opt.betas[1].value)
            if opt.eps is not None and "eps" in group:
                group["eps"] = opt.eps.value
        if self.scale_batchnorm:
            for module in modules:
                scale_batchnorm_momentum(module, self.forward_exponent, BATCHNORM_BASE_MOMENTUM)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"batch": self.batch, "kappa": self.kappa,
                               "ema_exponent": self.ema_exponent, "period": self.period,
                               "forward_exponent": self.forward_exponent}
        for v in (self.optimizer.lr, *(self.optimizer.betas or ()),
                  *([self.optimizer.eps] if self.optimizer.eps else [])):
            out[v.name] = {"base": v.base, "effective": v.value}
        return out


def resolve(cfg: Config, batch: int) -> ScaledHyperparams:
    """Resolve the recipe's base values (stated at scaling.reference_batch) for ``batch``."""
    s, o = cfg.scaling, cfg.optim
    k = kappa(batch, s.reference_batch)
    return ScaledHyperparams(
        batch=batch, kappa=k,
        optimizer=scale_optimizer(o.name, k, o.lr, o.betas, o.eps, s.rule),
        ema_exponent=ema_kappa(k, s.rule), period=cfg.ema.period, warmup=cfg.ema.warmup,
        reference_batch=s.reference_batch,
        forward_exponent=k / cfg.train.grad_accumulation if s.rule == "ema" else 1.0,
        scale_batchnorm=s.batchnorm and s.rule == "ema",
    )
