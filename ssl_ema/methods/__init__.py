"""Methods: one file each, registered in `ssl_ema.methods.registry` when imported.

Every module of this package is imported here (in name order), so a new method is one new file:
its ``register(MethodSpec(...))`` call makes it known to the config, the checks, the data
pipelines and the tests.
"""

from __future__ import annotations

import importlib
import pkgutil

from ssl_ema.config_schema import Config
from ssl_ema.methods.base import TeacherStudentMethod
from ssl_ema.methods.registry import METHODS, MethodSpec, method_spec

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build_method(cfg: Config, in_chans: int, num_classes: int = 0) -> TeacherStudentMethod:
    """The registered method ``cfg.method.name``, for images of ``in_chans`` channels and (for
    the classification methods) ``num_classes`` classes."""
    return method_spec(cfg.method.name).build(cfg, in_chans, num_classes)


__all__ = ["METHODS", "MethodSpec", "TeacherStudentMethod", "build_method", "method_spec"]
