"""BYOL's `MethodSpec`; the method is `ssl_ema.methods.byol` (imported only when it is built).
Its head sizes are keys of the shared ``method:`` section (`ssl_ema.config_schema.MethodConfig`)."""

from __future__ import annotations

from ssl_ema.methods.spec import MethodSpec

SPEC = MethodSpec(name="byol", build="ssl_ema.methods.byol:BYOL",
                  loader_views="ssl_ema.data.views:pair_views",
                  device_views="ssl_ema.data.gpu_augment:pair_specs", pair_views=True)
