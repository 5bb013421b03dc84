"""BYOL's recipe section (``byol:``, its heads) and its `MethodSpec`; the method is
`ssl_ema.methods.byol` (imported only when it is built)."""

from __future__ import annotations

from dataclasses import dataclass

from ssl_ema.methods.spec import MethodSpec


@dataclass(frozen=True)
class BYOLConfig:
    """The ``byol:`` recipe section; defaults are BYOL's (Grill et al. 2020, Sec. 3.3)."""

    projection_hidden_dim: int = 4096
    projection_dim: int = 256
    prediction_hidden_dim: int = 4096


SPEC = MethodSpec(name="byol", build="ssl_ema.methods.byol:BYOL",
                  loader_views="ssl_ema.data.views:pair_views",
                  device_views="ssl_ema.data.gpu_augment:pair_specs", pair_views=True,
                  section=BYOLConfig,
                  tiny_overrides=("byol.projection_hidden_dim=32", "byol.projection_dim=16",
                                  "byol.prediction_hidden_dim=32"))
