"""ssl_ema: self- and semi-supervised teacher-student training where the teacher is an EMA of the
student, with the EMA Scaling Rule (Busbridge et al. 2023). docs/PYTHON_API.md shows the API.

``import ssl_ema`` is cheap: each name below is imported from its module on first use (PEP 562),
so the command-line tools, which import submodules directly, never pay for torch or the trainer
before their input is checked.

- config: `load_config` (a recipe + ``a.b=c`` overrides), `config_from` (a dict), `Config`,
  `ConfigError` (the one-line error of any bad input);
- training: `train` (a run from Python, optionally on your own `Dataset` and backbone module),
  `TrainedRun`, `Trainer` (the one loop);
- the EMA: `EMA` (teachers of one student, fused update), `recompute_batchnorm`; its momentum
  (`ssl_ema.momentum`, the EMA Scaling Rule): `update_momentum`, `warmup_momentum`;
- scaling: `kappa`, `scale_momentum`, `scale_optimizer`, `ScaledValue`;
- methods: `register`, `MethodSpec`, `METHODS`, `TeacherStudentMethod`
  (docs/ADDING_A_METHOD.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The one place the version is written: pyproject.toml reads it (tool.setuptools.dynamic).
__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "Config": "ssl_ema.config",
    "ConfigError": "ssl_ema.config",
    "config_from": "ssl_ema.config",
    "load_config": "ssl_ema.config",
    "train": "ssl_ema.engine.from_python",
    "TrainedRun": "ssl_ema.engine.from_python",
    "Trainer": "ssl_ema.engine.trainer",
    "EMA": "ssl_ema.ema",
    "recompute_batchnorm": "ssl_ema.ema",
    "update_momentum": "ssl_ema.momentum",
    "warmup_momentum": "ssl_ema.momentum",
    "ScaledValue": "ssl_ema.scaling",
    "kappa": "ssl_ema.scaling",
    "scale_momentum": "ssl_ema.scaling",
    "scale_optimizer": "ssl_ema.scaling",
    # The registry holds the built-in methods' specs (torch-free); a method's module is imported
    # when it is built.
    "METHODS": "ssl_ema.methods",
    "MethodSpec": "ssl_ema.methods",
    "TeacherStudentMethod": "ssl_ema.methods",
    "register": "ssl_ema.methods.registry",
}

__all__ = [
    "__version__", "Config", "ConfigError", "config_from", "load_config", "train", "TrainedRun",
    "Trainer", "EMA", "recompute_batchnorm", "update_momentum", "warmup_momentum", "ScaledValue",
    "kappa", "scale_momentum", "scale_optimizer", "METHODS", "MethodSpec", "TeacherStudentMethod",
    "register",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports lazily
    from ssl_ema.config import Config, ConfigError, config_from, load_config
    from ssl_ema.ema import EMA, recompute_batchnorm
    from ssl_ema.engine.from_python import TrainedRun, train
    from ssl_ema.engine.trainer import Trainer
    from ssl_ema.methods import METHODS, MethodSpec, TeacherStudentMethod
    from ssl_ema.methods.registry import register
    from ssl_ema.momentum import update_momentum, warmup_momentum
    from ssl_ema.scaling import ScaledValue, kappa, scale_momentum, scale_optimizer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ssl_ema' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
