"""The method registry: the built-in methods, registered explicitly below, and any added from
Python with :func:`register`. Everything that used to list methods by name derives from it: the
config's choices and sections (`ssl_ema.config`), the checks (`ssl_ema.config_checks`), what the
engine hands the data code (:func:`method_data`), and the tests' method lists.

A spec is torch-free (`ssl_ema.methods.spec`), so reading a recipe imports no method module; a
method's module is imported when the method or its views are built. A new method is its module
and its spec, added to ``BUILT_IN`` (docs/ADDING_A_METHOD.md).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from ssl_ema.config_schema import Config, ConfigError
from ssl_ema.methods import byol_spec, dino_spec, moco_spec, pseudo_label_spec, supervised_spec
from ssl_ema.methods.spec import Labels, MethodSpec, resolve_target

if TYPE_CHECKING:  # annotation only: the registry imports no torch
    from ssl_ema.data.method_data import MethodData
    from ssl_ema.methods.base import TeacherStudentMethod

# In the order the methods were first registered (choices and messages list them so).
BUILT_IN: tuple[MethodSpec, ...] = (byol_spec.SPEC, dino_spec.SPEC, moco_spec.SPEC,
                                    supervised_spec.SPEC, pseudo_label_spec.SPEC)

METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec``; a second method of the same name (or section key) is a programming error.
    A class given as ``build`` names its own evaluation (`TeacherStudentMethod.evaluation`)."""
    if not isinstance(spec.build, str) and hasattr(spec.build, "evaluation"):
        spec = dataclasses.replace(spec, evaluation=str(spec.build.evaluation))
    if (spec.labels == "semi") != (spec.unlabelled is not None):
        raise ValueError(f"method '{spec.name}': labels='semi' and unlabelled go together")
    taken = {s.key for s in METHODS.values() if s.section is not None}
    if spec.name in METHODS or (spec.section is not None and spec.key in taken):
        raise ValueError(f"method '{spec.name}' (section '{spec.key}') is registered twice")
    METHODS[spec.name] = spec
    return spec


for _spec in BUILT_IN:
    register(_spec)


def method_spec(name: str) -> MethodSpec:
    """The spec of ``name``; an unknown name is a ConfigError listing the registered ones."""
    if name not in METHODS:
        raise ConfigError(f"method.name: unknown value '{name}'; valid: {', '.join(METHODS)}")
    return METHODS[name]


def sections() -> dict[str, type]:
    """Top-level recipe key -> dataclass of every registered method section."""
    return {s.key: s.section for s in METHODS.values() if s.section is not None}


def section_key(name: str) -> str | None:
    """The recipe key of method ``name``'s own section; None without one (or unknown)."""
    spec = METHODS.get(name)
    return spec.key if spec is not None and spec.section is not None else None


def classification_methods() -> tuple[str, ...]:
    """Methods that train on labels (supervised, pseudo-labelling)."""
    return tuple(name for name, s in METHODS.items() if s.labels != "none")


def build_method(cfg: Config, in_chans: int, num_classes: int = 0) -> TeacherStudentMethod:
    """The registered method ``cfg.method.name``, for images of ``in_chans`` channels and (for
    the classification methods) ``num_classes`` classes."""
    return method_spec(cfg.method.name).builder()(cfg, in_chans, num_classes)  # type: ignore


def method_data(cfg: Config) -> MethodData:
    """What the data code builds for ``cfg.method.name``: its views, labels and unlabelled
    stream, looked up here once and handed to `ssl_ema.data.datasets.build_data`."""
    from ssl_ema.data.method_data import MethodData

    spec = method_spec(cfg.method.name)
    loader_views = resolve_target(spec.loader_views)
    device_views = None if spec.device_views is None else resolve_target(spec.device_views)
    unlabelled = None if spec.unlabelled is None else resolve_target(spec.unlabelled)(cfg)

    def views(family: str, mean: Any, std: Any) -> Any:
        return loader_views(cfg, family, mean, std)

    return MethodData(
        name=spec.name, loader_views=views,
        device_views=None if device_views is None else (lambda: device_views(cfg)),
        device_classify=spec.device_classify, labels=spec.labels, unlabelled=unlabelled,
        evaluation=spec.evaluation)


__all__ = ["BUILT_IN", "METHODS", "Labels", "MethodSpec", "build_method", "classification_methods",
           "method_data", "method_spec", "register", "section_key", "sections"]
