"""DINO's recipe section (``dino:``), its checks and its `MethodSpec`; the method is
`ssl_ema.methods.dino` (imported only when it is built)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ssl_ema.config_schema import Config, ConfigError
from ssl_ema.methods.spec import MethodSpec


@dataclass(frozen=True)
class DINOConfig:
    """DINO (Caron et al. 2021); defaults are the paper's ViT-S/16 ImageNet values."""

    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    output_dim: int = 65536
    head_batch_norm: bool = False  # BN in the head's MLP (DINO's use_bn_in_head)
    norm_last_layer: bool = True  # weight-normalised last layer with fixed norm
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04  # linear warm-up from here to teacher_temp ...
    warmup_teacher_temp_epochs: float = 30.0  # ... over these epochs (of samples)
    # Centre EMA c <- m c + (1 - m) mean(teacher output), once per forward pass: an EMA, so
    # its momentum is scaled like the teacher's (per forward, batch / accumulation samples).
    center_momentum: float = 0.9
    freeze_last_layer_epochs: float = 1.0  # no gradient to the last layer early on
    local_views: int = 6  # multi-crop: 2 global views + this many local views
    local_size: int = 96  # side of the local views (global views: data.image_size)
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    # Linear layers of the head's MLP before the weight-normalised last layer (the official
    # code's nlayers; lightly's CIFAR-10 benchmark uses 2) and their init: trunc_normal (std
    # 0.02, bias 0: official DINO, lightly's DINOProjectionHead) or torch (PyTorch's defaults,
    # which lightly's benchmark head keeps).
    head_layers: int = 3
    head_init: Literal["trunc_normal", "torch"] = "trunc_normal"
    # true: views of one resolution go through the networks in one pass (official DINO, so
    # BatchNorm sees them together); false: one pass per view, as lightly's benchmarks.
    batch_views: bool = True


def check(cfg: Config) -> None:
    d = cfg.section(DINOConfig)
    for key, value in {"output_dim": d.output_dim, "local_size": d.local_size,
                       "student_temp": d.student_temp, "teacher_temp": d.teacher_temp,
                       "warmup_teacher_temp": d.warmup_teacher_temp,
                       "head_layers": d.head_layers}.items():
        if value <= 0:
            raise ConfigError(f"dino.{key}: must be positive, got {value}")
    if not 0.0 <= d.center_momentum <= 1.0:
        raise ConfigError(f"dino.center_momentum: a momentum must lie in [0, 1], got "
                          f"{d.center_momentum}")


SPEC = MethodSpec(
    name="dino", build="ssl_ema.methods.dino:DINO",
    loader_views="ssl_ema.methods.dino:loader_views",
    device_views="ssl_ema.methods.dino:device_views", section=DINOConfig, check=check,
    tiny_overrides=("dino.output_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16",
                    "dino.local_views=2", "dino.local_size=4", "optim.clip_grad_norm=0.5",
                    "optim.weight_decay=0.04", "optim.weight_decay_end=0.4"))
