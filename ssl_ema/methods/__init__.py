"""Method registries: name -> constructor.

Self-supervised methods (``METHODS``) are built from ``(cfg, in_chans)``; classification methods
(``CLASSIFIERS``) also need the number of classes.
"""

from __future__ import annotations

from collections.abc import Callable

from ssl_ema.config import Config
from ssl_ema.methods.base import TeacherStudentMethod
from ssl_ema.methods.byol import BYOL
from ssl_ema.methods.dino import DINO
from ssl_ema.methods.pseudo_label import PseudoLabel
from ssl_ema.methods.supervised import Supervised

METHODS: dict[str, Callable[[Config, int], TeacherStudentMethod]] = {"byol": BYOL, "dino": DINO}
CLASSIFIERS: dict[str, Callable[[Config, int, int], TeacherStudentMethod]] = {
    "supervised": Supervised, "pseudo_label": PseudoLabel}


def build_method(cfg: Config, in_chans: int, num_classes: int = 0) -> TeacherStudentMethod:
    name = cfg.method.name
    if name in CLASSIFIERS:
        return CLASSIFIERS[name](cfg, in_chans, num_classes)
    return METHODS[name](cfg, in_chans)


__all__ = ["CLASSIFIERS", "METHODS", "TeacherStudentMethod", "build_method"]
