"""timm backbones, with the small-image ("CIFAR") ResNet stem used by SimCLR/BYOL on CIFAR."""

from __future__ import annotations

import timm
from timm.models.resnet import ResNet
from torch import nn

from ssl_ema.config import ConfigError


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


def build_backbone(
    name: str, *, in_chans: int = 3, image_size: int = 224, cifar_stem: bool = False
) -> nn.Module:
    """A timm model without classifier (``num_classes=0``): ``forward(x) -> (B, num_features)``.

    Weights are random: SSL trains from scratch, and tests must not need the internet.
    """
    kwargs: dict[str, object] = {"pretrained": False, "num_classes": 0, "in_chans": in_chans}
    try:  # transformers need the image size for their position embeddings
        model = timm.create_model(name, img_size=image_size, **kwargs)
    except TypeError:
        model = timm.create_model(name, **kwargs)
    if cifar_stem:
        apply_cifar_stem(model)
    return model
