"""Pseudo-labelling's recipe section (``pseudo_label:``), its checks and its `MethodSpec`; the
method is `ssl_ema.methods.pseudo_label` (imported only when it is built)."""

from __future__ import annotations

from dataclasses import dataclass

from ssl_ema.config_schema import Config, ConfigError
from ssl_ema.methods.spec import MethodSpec


@dataclass(frozen=True)
class PseudoLabelConfig:
    """The ``pseudo_label:`` recipe section (Sohn et al. 2020; Busbridge et al. 2023, Sec. 3.3);
    the defaults are FixMatch's CIFAR-10 values."""

    threshold: float = 0.95  # tau: keep pseudo-labels whose teacher confidence is >= tau
    mu: int = 7  # unlabelled images per labelled image in a batch
    unlabelled_weight: float = 1.0  # lambda_u
    randaugment_ops: int = 2  # strong views: torchvision RandAugment(ops, magnitude) + erasing
    randaugment_magnitude: int = 10


def check(cfg: Config) -> None:
    pl = cfg.section(PseudoLabelConfig)
    if cfg.labels.per_class <= 0:
        raise ConfigError("labels.per_class: pseudo_label needs a labelled subset; set it > 0 "
                          "(e.g. 400 for CIFAR-10 with 4,000 labels)")
    if not 0.0 <= pl.threshold <= 1.0:
        raise ConfigError(f"pseudo_label.threshold: must lie in [0, 1], got {pl.threshold}")
    if pl.mu < 1 or pl.unlabelled_weight < 0:
        raise ConfigError(f"pseudo_label.mu must be >= 1 and pseudo_label.unlabelled_weight "
                          f">= 0, got {pl.mu} and {pl.unlabelled_weight}")


SPEC = MethodSpec(
    name="pseudo_label", build="ssl_ema.methods.pseudo_label:PseudoLabel",
    loader_views="ssl_ema.methods.pseudo_label:views", labels="semi",
    unlabelled="ssl_ema.methods.pseudo_label:unlabelled", section=PseudoLabelConfig, check=check,
    device_classify=True, evaluation="classify")
