"""timm backbones, with the small-image ("CIFAR") ResNet stem used by SimCLR/BYOL on CIFAR."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import timm
from timm.models.resnet import ResNet
from torch import nn

from ssl_ema.config_schema import Config, ConfigError


def apply_cifar_stem(model: nn.Module) -> None:
    """Replace a timm ResNet's 7x7/2 conv + max-pool by a 3x3/1 conv (Chen et al. 2020, App. B.9).

    On 32x32 images the ImageNet stem downsamples 4x before the first block and costs accuracy.
    """
    if not isinstance(model, ResNet) or not isinstance(model.conv1, nn.Conv2d):
        raise ConfigError(
            "model.cifar_stem applies to timm ResNets with a plain stem (resnet18, resnet50, ...); "
            "set model.cifar_stem=false for this backbone"
        )
    old = model.conv1
    model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def drop_stem_activation(model: nn.Module) -> None:
    """Remove the ReLU after a timm ResNet's stem BatchNorm.

    lightly's CIFAR-10 benchmarks build their backbone from the children of ResNetGenerator; its
    stem ReLU is applied in ``ResNet.forward``, not by a child module, so that backbone has none.
    """
    if not isinstance(model, ResNet):
        raise ConfigError("model.stem_activation=false applies to timm ResNets; set it to true "
                          "for this backbone")
    model.act1 = nn.Identity()


def reset_to_torch_defaults(model: nn.Module) -> None:
    """Re-initialise every layer with PyTorch's defaults (``reset_parameters``).

    timm's ResNet init (Kaiming-normal fan-out, last BN of each block zeroed) starts the
    conv weights larger in norm than PyTorch's Kaiming-uniform(a=sqrt(5)) default; behind
    BatchNorm the update's effect scales with 1/||w||^2 (van Laarhoven 2017), so the same SGD
    learning rate trains slower at first (docs/RESULTS.md, "Initialisation sets the effective
    learning rate"). lightly's CIFAR-10 benchmarks (ResNetGenerator)
    use the defaults. Parameters that are not layers' own (a ViT's pos_embed) are left as timm
    set them.
    """
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()


def create_timm_backbone(
    name: str, *, in_chans: int = 3, image_size: int = 224, patch_size: int = 0,
) -> tuple[nn.Module, dict[str, object]]:
    """The timm model without classifier and the ``timm.create_model`` kwargs that built it.

    Weights are random: SSL trains from scratch, and tests must not need the internet.
    Transformers get the image size for their position embeddings, ``dynamic_img_size`` so that
    multi-crop's smaller local views interpolate them (as DINO does), and ``patch_size`` if set.
    The kwargs are returned so an exported backbone can record how to rebuild it
    (``models/export.py``).
    """
    kwargs: dict[str, object] = {"num_classes": 0, "in_chans": in_chans}
    vit: dict[str, object] = {"img_size": image_size, "dynamic_img_size": True,
                              **({"patch_size": patch_size} if patch_size else {})}
    try:
        return timm.create_model(name, pretrained=False, **vit, **kwargs), {**vit, **kwargs}
    except TypeError:
        if patch_size:
            raise ConfigError(
                f"model.patch_size: '{name}' has no patch size; set it to 0"
            ) from None
        return timm.create_model(name, pretrained=False, **kwargs), kwargs


def build_backbone(
    name: str, *, in_chans: int = 3, image_size: int = 224, cifar_stem: bool = False,
    patch_size: int = 0, init: str = "timm", stem_activation: bool = True,
) -> nn.Module:
    """A timm model without classifier (``num_classes=0``): ``forward(x) -> (B, num_features)``,
    with the CIFAR stem if asked (see `create_timm_backbone`), ``init`` "timm" (timm's own) or
    "torch" (`reset_to_torch_defaults`), and without the stem ReLU if ``stem_activation`` is
    false (`drop_stem_activation`)."""
    if init not in ("timm", "torch"):
        raise ConfigError(f"model.init: unknown '{init}'; valid: timm, torch")
    model, _ = create_timm_backbone(name, in_chans=in_chans, image_size=image_size,
                                    patch_size=patch_size)
    if cifar_stem:
        apply_cifar_stem(model)
    if not stem_activation:
        drop_stem_activation(model)
    if init == "torch":
        reset_to_torch_defaults(model)
    return model


# A backbone given from Python (`ssl_ema.models.custom`) replaces the recipe's while it is set.
# Scoped rather than passed: every method builds its backbone here, once per role (student,
# teacher, each EMA copy), and its builder keeps the registry's (cfg, in_chans, num_classes).
_GIVEN: ContextVar[Callable[[], nn.Module] | None] = ContextVar("given_backbone", default=None)


@contextmanager
def given_backbone(build: Callable[[], nn.Module] | None) -> Iterator[None]:
    """Within the block, `backbone_from_config` returns ``build()`` (None: the recipe's)."""
    token = _GIVEN.set(build)
    try:
        yield
    finally:
        _GIVEN.reset(token)


def backbone_from_config(cfg: Config, in_chans: int) -> nn.Module:
    """The one way to build the recipe's backbone: `build_backbone` with every ``model.*`` key
    that shapes it (name, CIFAR stem, patch size, init, stem activation) and the training image
    size, for images of ``in_chans`` channels; or the backbone given from Python
    (`given_backbone`)."""
    given = _GIVEN.get()
    if given is not None:
        return given()
    m = cfg.model
    if m.backbone == "given":
        raise ConfigError("model.backbone=given: the module is passed from Python "
                          "(ssl_ema.train(backbone=...)); name a timm model here")
    return build_backbone(m.backbone, in_chans=in_chans, image_size=cfg.data.image_size,
                          cifar_stem=m.cifar_stem, patch_size=m.patch_size, init=m.init,
                          stem_activation=m.stem_activation)
