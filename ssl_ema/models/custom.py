"""A backbone given from Python instead of a timm name: an ``nn.Module`` mapping images
``(B, C, H, W)`` to features ``(B, num_features)``, as timm's models with ``num_classes=0``.

The methods read the feature dimension from ``backbone.num_features`` (timm's attribute) to size
their heads; a module without one gets it from the caller. One forward of two blank images at
the training size checks the output's shape before anything is built on it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ssl_ema.config_schema import ConfigError

BackboneSource = nn.Module | Callable[[], nn.Module]


def feature_dim(module: nn.Module, num_features: int | None) -> int:
    """``num_features`` if given (and then the module's attribute must agree), else the
    module's ``num_features``; a one-line error when neither says."""
    own = getattr(module, "num_features", None)
    if num_features is None and not isinstance(own, int):
        raise ConfigError(f"backbone {type(module).__name__} has no integer num_features; pass "
                          "num_features= (the size of its output features)")
    if num_features is not None and isinstance(own, int) and own != num_features:
        raise ConfigError(f"num_features={num_features} but backbone {type(module).__name__} "
                          f"says num_features={own}; drop the argument or fix the module")
    return num_features if num_features is not None else int(own)  # type: ignore[arg-type]


@torch.no_grad()
def check_features(module: nn.Module, dim: int, in_chans: int, image_size: int) -> None:
    """The module maps ``(2, in_chans, image_size, image_size)`` to ``(2, dim)``; its mode (and
    so its BatchNorm statistics) is left as it was."""
    was_training = module.training
    module.eval()
    try:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        out = module(torch.zeros(2, in_chans, image_size, image_size, device=device))
    except Exception as e:
        raise ConfigError(f"backbone {type(module).__name__} fails on images of shape "
                          f"(2, {in_chans}, {image_size}, {image_size}) (data.image_size): "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                          ) from e
    finally:
        module.train(was_training)
    if not torch.is_tensor(out) or tuple(out.shape) != (2, dim):
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ConfigError(f"backbone {type(module).__name__} returns {shape} for 2 images; a "
                          f"backbone returns features (batch, num_features={dim}): drop its "
                          "classifier head, pool and flatten")


def backbone_builder(source: BackboneSource, in_chans: int, image_size: int,
                     num_features: int | None = None) -> Callable[[], nn.Module]:
    """A builder for `ssl_ema.models.backbones.given_backbone`, checked once now. ``source``: a
    module (the student gets it, the teacher and EMA copies get deep copies, later loaded from
    the student anyway) or a function that builds a fresh one per call (for modules that
    ``copy.deepcopy`` breaks)."""
    first = source if isinstance(source, nn.Module) or not callable(source) else source()
    if not isinstance(first, nn.Module):
        raise ConfigError(f"backbone: expected an nn.Module, a function returning one or a timm "
                          f"model name, got {type(first).__name__}")
    dim = feature_dim(first, num_features)
    check_features(first, dim, in_chans, image_size)
    pending = [first]

    def build() -> nn.Module:
        if pending:
            module = pending.pop()
        else:
            module = copy.deepcopy(source) if isinstance(source, nn.Module) else source()
        module.num_features = dim  # type: ignore[assignment]  # what the methods' heads read
        return module

    return build


def describe(source: object) -> str:
    """``module.QualName`` of a given module's class, or of a function or class, for the run
    header."""
    kind = type(source) if isinstance(source, nn.Module) or not callable(source) else source
    return f"{getattr(kind, '__module__', '?')}.{getattr(kind, '__qualname__', repr(kind))}"
