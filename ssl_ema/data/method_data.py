"""What the data code builds for a method, handed to it by the engine.

The engine looks the method up once (`ssl_ema.methods.registry.method_data`) and passes this to
`ssl_ema.data.datasets.build_data`; nothing in `ssl_ema.data` reads the method registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: this module stays free of torch
    from ssl_ema.data.classify_views import Unlabelled
    from ssl_ema.data.gpu_augment import ViewSpec


@dataclass(frozen=True)
class MethodData:
    """The training views, labels and unlabelled stream of one method in one run."""

    name: str  # method.name, for messages
    # (image family "digits" | "rgb", mean, std) -> the loader pipeline's per-sample transform
    loader_views: Callable[[str, Any, Any], Callable[..., Any]]
    # () -> the device pipeline's view distributions; None: the method has none
    device_views: Callable[[], tuple[ViewSpec, ...]] | None = None
    # the device pipeline's classification streams (weak + strong views with labels) instead
    device_classify: bool = False
    labels: str = "none"  # "none", "all" or "semi" (`ssl_ema.methods.spec.Labels`)
    unlabelled: Unlabelled | None = None  # labels="semi": how unlabelled images are viewed
    evaluation: str = "knn"  # "knn" or "classify"
