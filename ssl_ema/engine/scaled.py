"""The hyperparameters of one batch size: the recipe's base values resolved for kappa.

Resolved once per batch size (and again at each switch of a batch schedule), applied to the
optimizer's parameter groups and the BatchNorm layers, and logged as base, kappa, effective.
Every EMA momentum goes through the batch's `ssl_ema.momentum.MomentumRule`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ssl_ema.config import Config
from ssl_ema.momentum import MomentumRule
from ssl_ema.scaling import OptimizerHyperparams, kappa, scale_optimizer, set_batchnorm_momentum


@dataclass(frozen=True)
class ScaledHyperparams:
    batch: int
    kappa: float
    optimizer: OptimizerHyperparams
    momentum: MomentumRule  # every EMA's momentum at this batch
    scale_batchnorm: bool

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
                set_batchnorm_momentum(module, self.momentum.batchnorm())

    def describe(self) -> dict[str, Any]:
        m = self.momentum
        out: dict[str, Any] = {"batch": self.batch, "kappa": self.kappa,
                               "ema_exponent": m.kappa, "period": m.period,
                               "forward_exponent": m.forward_exponent}
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
        momentum=MomentumRule.resolve(k, s.rule, period=cfg.ema.period, warmup=cfg.ema.warmup,
                                      reference_batch=s.reference_batch,
                                      grad_accumulation=cfg.train.grad_accumulation),
        scale_batchnorm=s.batchnorm and s.rule == "ema",
    )
