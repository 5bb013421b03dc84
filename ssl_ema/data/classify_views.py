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

import torch
from torchvision.transforms import v2

from ssl_ema.data.views import Transform


@dataclass(frozen=True)
class WeakStrong:
    """The two view distributions; called directly it gives the weak view (supervised)."""

    weak: Transform
    strong: Transform

    def __call__(self, image: object) -> object:
        return self.weak(image)


def _erase() -> v2.Transform:
    # Cutout (DeVries & Taylor 2017) of up to half the side, as FixMatch; on normalised images,
    # value 0 is the mean.
    return v2.RandomErasing(p=1.0, scale=(0.02, 0.25), ratio=(1.0, 1.0), value=0.0)


def rgb_weak_strong(image_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                    ops: int, magnitude: int) -> WeakStrong:
    """PIL image -> weak or strong (3, S, S) float tensor."""
    shift = [v2.PILToTensor(), v2.Resize(image_size, antialias=True),
             v2.RandomCrop(image_size, padding=image_size // 8, padding_mode="reflect"),
             v2.RandomHorizontalFlip()]
    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return WeakStrong(
        weak=v2.Compose([*shift, *to_float]),
        strong=v2.Compose([*shift, v2.RandAugment(ops, magnitude), *to_float, _erase()]),
    )


def digits_weak_strong(image_size: int, mean: float, std: float, ops: int,
                       magnitude: int) -> WeakStrong:
    """(1, 8, 8) float tensor in [0, 1] -> weak or strong (1, S, S) float tensor."""
    shift = [v2.Resize(image_size, antialias=True),
             v2.RandomAffine(degrees=0, translate=(0.125, 0.125))]
    uint8 = [v2.ToDtype(torch.uint8, scale=True), v2.RandAugment(ops, magnitude),
             v2.ToDtype(torch.float32, scale=True)]
    norm = v2.Normalize([mean], [std])
    return WeakStrong(weak=v2.Compose([*shift, norm]),
                      strong=v2.Compose([*shift, *uint8, norm, _erase()]))
