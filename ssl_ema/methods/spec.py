"""`MethodSpec`: everything the rest of the package needs to know about a method, in one place.

A spec is torch-free: the config reads its section, checks and choices without importing the
method's module, which is imported (with torch) only when the method or its views are built.
Each of ``build``, ``loader_views``, ``device_views`` and ``unlabelled`` is a callable or a
``"module:attribute"`` string naming one (the entry-point notation of Python packaging).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ssl_ema.config_schema import Config

# What a method trains on (`ssl_ema.data.labels`): "none" (self-supervised; labels ride along in
# the batch for the kNN evaluation only), "all" (every training label), "semi" (a labelled
# subset + unlabelled groups, FixMatch's batch).
Labels = Literal["none", "all", "semi"]
# A callable, or "module:attribute" naming one (imported on first use).
Target = Callable[..., Any] | str


def resolve_target(target: Target) -> Callable[..., Any]:
    """The callable ``target`` names (``"ssl_ema.methods.dino:DINO"``), or ``target`` itself."""
    if not isinstance(target, str):
        return target
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class MethodSpec:
    """A method: its recipe name, how it is built, what it trains on, its config section."""

    name: str  # method.name in recipes
    build: Target  # (cfg, in_chans, num_classes) -> the method (a TeacherStudentMethod)
    # (cfg, image family "digits" | "rgb", mean, std) -> the loader pipeline's transform
    loader_views: Target
    # cfg -> the device pipeline's view distributions (`ssl_ema.data.gpu_augment.ViewSpec`s);
    # None: data.pipeline=device is refused ...
    device_views: Target | None = None
    # ... unless the method trains on the classification streams (weak, + strong views with
    # labels: `ssl_ema.data.device_classify`) instead of view pairs.
    device_classify: bool = False
    labels: Labels = "none"
    # labels="semi" only: cfg -> how the unlabelled images are drawn and viewed
    # (`ssl_ema.data.classify_views.Unlabelled`), handed to the data code by the engine.
    unlabelled: Target | None = None
    section: type | None = None  # the method's own config dataclass ...
    section_key: str = ""  # ... under this top-level recipe key (default: name)
    # Cross-field checks of the method's own keys, run by `config_checks.validate`; raise
    # ConfigError with a one-line fix.
    check: Callable[[Config], None] | None = None
    # Overrides that make the method tiny for the generic 8 px smoke tests (tests/helpers.py
    # adds them to the shared tiny data, batch and backbone).
    tiny_overrides: tuple[str, ...] = ()
    # Whether data.views (BYOL's or SimCLR's view pair) chooses this method's views.
    pair_views: bool = False
    # How the engine evaluates it (`ssl_ema.eval.evaluations.EVALUATIONS`): "knn" on frozen
    # backbone features, or "classify" (top-1 of its own classifier); the class's
    # ``evaluation`` attribute when ``build`` is a class given directly.
    evaluation: str = "knn"

    @property
    def key(self) -> str:
        return self.section_key or self.name

    def builder(self) -> Callable[..., Any]:
        """The method's class (or factory), importing its module."""
        return resolve_target(self.build)
