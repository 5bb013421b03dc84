"""The supervised method's recipe section (``supervised:``), its checks and its `MethodSpec`;
the method is `ssl_ema.methods.supervised` (imported only when it is built)."""

from __future__ import annotations

from dataclasses import dataclass

from ssl_ema.config_schema import Config, ConfigError
from ssl_ema.methods.spec import MethodSpec


@dataclass(frozen=True)
class SupervisedConfig:
    """The ``supervised:`` recipe section."""

    label_smoothing: float = 0.0


def check(cfg: Config) -> None:
    smoothing = cfg.section(SupervisedConfig).label_smoothing
    if not 0.0 <= smoothing < 1.0:
        raise ConfigError(f"supervised.label_smoothing: must lie in [0, 1), got {smoothing}")


SPEC = MethodSpec(
    name="supervised", build="ssl_ema.methods.supervised:Supervised",
    loader_views="ssl_ema.methods.supervised:weak_views", labels="all", section=SupervisedConfig,
    check=check, device_classify=True, evaluation="classify")
