"""Methods: one module each (the ``nn.Module``), with a torch-free spec beside it
(``<name>_spec.py``: its recipe section, checks and `MethodSpec`), registered explicitly in
`ssl_ema.methods.registry`. Importing this package imports no method module and no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ssl_ema.methods.registry import METHODS, MethodSpec, build_method, method_spec

if TYPE_CHECKING:
    from ssl_ema.methods.base import TeacherStudentMethod


def __getattr__(name: str) -> Any:
    if name == "TeacherStudentMethod":  # the base class imports torch: on first use only
        return importlib.import_module("ssl_ema.methods.base").TeacherStudentMethod
    raise AttributeError(f"module 'ssl_ema.methods' has no attribute '{name}'")


__all__ = ["METHODS", "MethodSpec", "TeacherStudentMethod", "build_method", "method_spec"]
