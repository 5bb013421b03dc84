"""The method registry: each method file registers one `MethodSpec`, and everything that used to
list methods by name derives from it: the config's choices and sections (`ssl_ema.config`), the
checks (`ssl_ema.config_checks`), the training views of each data pipeline (`ssl_ema.data`), and
the tests' method lists.

``ssl_ema/methods/__init__.py`` imports every module of this package, so importing anything from
``ssl_ema.methods`` fills the registry; a new method is one new file (docs/ADDING_A_METHOD.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ssl_ema.config_schema import Config, ConfigError

if TYPE_CHECKING:  # annotation only: the registry imports nothing from ssl_ema.data
    from ssl_ema.data.classify_views import Unlabelled

# What a method trains on (`ssl_ema.data.labels`): "none" (self-supervised; labels ride along in
# the batch for the kNN evaluation only), "all" (every training label), "semi" (a labelled
# subset + unlabelled groups, FixMatch's batch).
Labels = Literal["none", "all", "semi"]
# (cfg, image family "digits" | "rgb", mean, std) -> the loader pipeline's per-sample transform.
LoaderViews = Callable[[Config, str, Any, Any], Callable[..., Any]]
# cfg -> the device pipeline's view distributions (`ssl_ema.data.gpu_augment.ViewSpec`s).
DeviceViews = Callable[[Config], tuple[Any, ...]]


@dataclass(frozen=True)
class MethodSpec:
    """Everything the rest of the package needs to know about a method, in one place."""

    name: str  # method.name in recipes
    build: Callable[[Config, int, int], Any]  # (cfg, in_chans, num_classes) -> the method
    loader_views: LoaderViews
    device_views: DeviceViews | None = None  # None: data.pipeline=device is refused ...
    # ... unless the method trains on the classification streams (weak, + strong views with
    # labels: `ssl_ema.data.device_classify`) instead of view pairs.
    device_classify: bool = False
    labels: Labels = "none"
    # labels="semi" only: cfg -> how the unlabelled images are drawn and viewed
    # (`ssl_ema.data.classify_views.Unlabelled`), read by the data code from the method.
    unlabelled: Callable[[Config], Unlabelled] | None = None
    section: type | None = None  # the method's own config dataclass ...
    section_key: str = ""  # ... under this top-level recipe key (default: name)
    # Cross-field checks of the method's own keys, run by `config_checks.validate`; raise
    # ConfigError with a one-line fix.
    check: Callable[[Config], None] | None = None
    # Overrides that make the method tiny for the generic 8 px smoke tests (tests/); the
    # shared TINY list there already shrinks the data, batch and BYOL-style heads.
    tiny_overrides: tuple[str, ...] = ()
    # Whether data.views (BYOL's or SimCLR's view pair) chooses this method's views.
    pair_views: bool = False

    @property
    def key(self) -> str:
        return self.section_key or self.name

    @property
    def evaluation(self) -> str:
        """The method class's ``evaluation`` ("knn" or "classify", `ssl_ema.eval`)."""
        return str(getattr(self.build, "evaluation", "knn"))


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec``; a second method of the same name (or section key) is a programming error."""
    if (spec.labels == "semi") != (spec.unlabelled is not None):
        raise ValueError(f"method '{spec.name}': labels='semi' and unlabelled go together")
    taken = {s.key for s in METHODS.values() if s.section is not None}
    if spec.name in METHODS or (spec.section is not None and spec.key in taken):
        raise ValueError(f"method '{spec.name}' (section '{spec.key}') is registered twice")
    METHODS[spec.name] = spec
    return spec


def method_spec(name: str) -> MethodSpec:
    """The spec of ``name``; an unknown name is a ConfigError listing the registered ones."""
    if name not in METHODS:
        raise ConfigError(f"method.name: unknown value '{name}'; valid: {', '.join(METHODS)}")
    return METHODS[name]


def sections() -> dict[str, type]:
    """Top-level recipe key -> dataclass of every registered method section."""
    return {s.key: s.section for s in METHODS.values() if s.section is not None}


def classification_methods() -> tuple[str, ...]:
    """Methods that train on labels (supervised, pseudo-labelling)."""
    return tuple(name for name, s in METHODS.items() if s.labels != "none")
