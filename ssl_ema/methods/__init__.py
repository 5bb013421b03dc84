"""Method registry: name -> constructor ``(cfg, in_chans) -> TeacherStudentMethod``."""

from __future__ import annotations

from collections.abc import Callable

from ssl_ema.config import Config
from ssl_ema.methods.base import TeacherStudentMethod
from ssl_ema.methods.byol import BYOL
from ssl_ema.methods.dino import DINO

METHODS: dict[str, Callable[[Config, int], TeacherStudentMethod]] = {"byol": BYOL, "dino": DINO}


def build_method(cfg: Config, in_chans: int) -> TeacherStudentMethod:
    return METHODS[cfg.method.name](cfg, in_chans)


__all__ = ["METHODS", "TeacherStudentMethod", "build_method"]
