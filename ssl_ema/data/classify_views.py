"""Weak and strong views for the classification methods (supervised, pseudo_label).

Weak: the standard CIFAR augmentation, a random crop of the 4 px reflect-padded image and a
horizontal flip (FixMatch's "flip-and-shift", Sohn et al. 2020, Sec. 2.3; also the supervised
baseline of Morales-Brotons et al. 2024). Strong: the weak view, then torchvision's RandAugment
and a Cutout-like erasing of a square patch (FixMatch, Sec. 2.3 and App. D). RandAugment runs on
uint8 images, before normalisation, as its operations (posterize, solarize) expect.

Digits (grey 8x8) are neither flipped nor colour-jittered (a flipped 2 is not a 2): weak is a
small translation; strong adds RandAugment on the uint8 grey image (its colour operations leave
one channel unchanged) and erasing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import v2

from ssl_ema.data.views import Transform


@dataclass(frozen=True)
class Unlabelled:
    """How a semi-supervised method sees its unlabelled images (FixMatch, Sohn et al. 2020,
    Sec. 2.3): ``mu`` per labelled image in a batch, each as a weak view and a strong view made
    with RandAugment(``ops``, ``magnitude``). A method registers it (the registry's
    ``unlabelled``), so the data code needs no method's config section."""

    mu: int
    ops: int
    magnitude: int


@dataclass(frozen=True)
class WeakStrong:
    """The view distributions; called directly it gives the weak view (supervised, which draws
    no strong views: ``strong`` is None)."""

    weak: Transform
    strong: Transform | None

    def __call__(self, image: object) -> object:
        return self.weak(image)


def _erase() -> v2.Transform:
    # Cutout (DeVries & Taylor 2017) of up to half the side, as FixMatch; on normalised images,
    # value 0 is the mean.
    return v2.RandomErasing(p=1.0, scale=(0.02, 0.25), ratio=(1.0, 1.0), value=0.0)


def weak_strong(family: str, image_size: int, mean: Any, std: Any,
                unlabelled: Unlabelled | None) -> WeakStrong:
    """The views of an image family ("digits" or "rgb"); strong views only for a method with
    unlabelled images."""
    build = digits_weak_strong if family == "digits" else rgb_weak_strong
    return build(image_size, mean, std, unlabelled)


def rgb_weak_strong(image_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                    unlabelled: Unlabelled | None) -> WeakStrong:
    """PIL image -> weak or strong (3, S, S) float tensor."""
    shift = [v2.PILToTensor(), v2.Resize(image_size, antialias=True),
             v2.RandomCrop(image_size, padding=image_size // 8, padding_mode="reflect"),
             v2.RandomHorizontalFlip()]
    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    strong = None if unlabelled is None else v2.Compose(
        [*shift, v2.RandAugment(unlabelled.ops, unlabelled.magnitude), *to_float, _erase()])
    return WeakStrong(weak=v2.Compose([*shift, *to_float]), strong=strong)


def digits_weak_strong(image_size: int, mean: float, std: float,
                       unlabelled: Unlabelled | None) -> WeakStrong:
    """(1, 8, 8) float tensor in [0, 1] -> weak or strong (1, S, S) float tensor."""
    shift = [v2.Resize(image_size, antialias=True),
             v2.RandomAffine(degrees=0, translate=(0.125, 0.125))]
    norm = v2.Normalize([mean], [std])
    if unlabelled is None:
        return WeakStrong(weak=v2.Compose([*shift, norm]), strong=None)
    uint8 = [v2.ToDtype(torch.uint8, scale=True),
             v2.RandAugment(unlabelled.ops, unlabelled.magnitude),
             v2.ToDtype(torch.float32, scale=True)]
    return WeakStrong(weak=v2.Compose([*shift, norm]),
                      strong=v2.Compose([*shift, *uint8, norm, _erase()]))
