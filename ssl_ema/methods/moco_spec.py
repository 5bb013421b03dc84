"""MoCo's recipe section (``moco:``), its checks and its `MethodSpec`; the method is
`ssl_ema.methods.moco` (imported only when it is built)."""

from __future__ import annotations

from dataclasses import dataclass

from ssl_ema.config_schema import Config, ConfigError
from ssl_ema.methods.spec import MethodSpec


@dataclass(frozen=True)
class MoCoConfig:
    """The ``moco:`` recipe section; defaults are lightly's CIFAR-10 benchmark values."""

    hidden_dim: int = 512  # projection head MLP
    output_dim: int = 128  # key / query dimension
    temperature: float = 0.1
    # Negatives: teacher keys of this many most recent images (samples, not batches).
    queue_size: int = 4096


def check(cfg: Config) -> None:
    mc = cfg.section(MoCoConfig)
    for key, value in {"hidden_dim": mc.hidden_dim, "output_dim": mc.output_dim,
                       "temperature": mc.temperature, "queue_size": mc.queue_size}.items():
        if value <= 0:
            raise ConfigError(f"moco.{key}: must be positive, got {value}")
    batch = max([cfg.train.batch_size, *(b for _, b in cfg.train.batch_schedule)])
    if mc.queue_size < batch:
        raise ConfigError(f"moco.queue_size: {mc.queue_size} keys is fewer than one batch "
                          f"({batch}); the queue holds the negatives of several batches, so "
                          "raise it (e.g. 4096) or lower the batch")


SPEC = MethodSpec(
    name="moco", build="ssl_ema.methods.moco:MoCo", loader_views="ssl_ema.data.views:pair_views",
    device_views="ssl_ema.data.gpu_augment:pair_specs", pair_views=True, section=MoCoConfig,
    check=check,
    tiny_overrides=("moco.hidden_dim=32", "moco.output_dim=16", "moco.queue_size=64"))
