"""Optimizers for the student, with batch-size-scaled learning rate.

Biases and normalisation parameters (1-D tensors) get no weight decay, as in BYOL (Grill et al.
2020, App. J) and SimCLR, unless ``optim.decay_norm_bias`` (lightly's CIFAR-10 benchmarks decay
every parameter); LARS comes from lightly.
"""

from __future__ import annotations

import torch
from lightly.utils.lars import LARS
from torch import nn

from ssl_ema.config import OptimConfig
from ssl_ema.schedules import cosine, warmup_cosine


def param_groups(module: nn.Module, weight_decay: float,
                 decay_norm_bias: bool = False) -> list[dict[str, object]]:
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 and not decay_norm_bias else decay).append(p)
    # "decay" marks the group whose weight decay follows optim.weight_decay_end's schedule.
    groups = [{"params": decay, "weight_decay": weight_decay, "decay": True},
              {"params": no_decay, "weight_decay": 0.0, "decay": False}]
    return [g for g in groups if g["params"]]


def build_optimizer(module: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """Optimizer over the trainable parameters of ``module`` at the (already scaled) ``lr``."""
    groups = param_groups(module, cfg.weight_decay, cfg.decay_norm_bias)
    # CUDA: torch's fused kernels update all parameters in a few launches (foreach's share of
    # a BYOL step: docs/RESULTS.md, "BYOL training images/s on one H100").
    # Elsewhere torch's foreach default.
    fused = {"fused": True} if all(p.is_cuda for p in module.parameters()) else {}
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               **fused)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum)
    # Adam's betas and eps are set per batch size by `ScaledHyperparams.apply` (square-root rule).
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, **fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, **fused)
    raise ValueError(f"unknown optimizer '{cfg.name}'; valid: sgd, lars, adam, adamw")


def scheduled_lr_and_weight_decay(cfg: OptimConfig, epochs: int, peak_lr: float,
                                  progress: float, epoch: int) -> tuple[float, float]:
    """This step's lr (warm-up then cosine to ``min_lr_ratio`` x peak) and weight decay (cosine
    to ``weight_decay_end``), as functions of progress; with ``schedule_per_epoch`` the value at
    the epoch's start, as a per-epoch lr scheduler."""
    at = epoch / epochs if cfg.schedule_per_epoch else progress
    lr = warmup_cosine(peak_lr, at, cfg.warmup_epochs / epochs, peak_lr * cfg.min_lr_ratio)
    wd = cfg.weight_decay if cfg.weight_decay_end is None else \
        cosine(cfg.weight_decay, cfg.weight_decay_end, at)
    return lr, wd


def set_lr_and_weight_decay(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """``lr`` for every group; ``wd`` for the decayed group (biases and norms keep 0)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("decay", False):
            group["weight_decay"] = wd
