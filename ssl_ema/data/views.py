"""Augmented views for self-supervised methods, and the plain transform used for evaluation.

RGB images use lightly's BYOL transforms (Grill et al. 2020, Table 6: asymmetric blur and
solarisation). On 32 px images blur is switched off, as in lightly's and solo-learn's CIFAR
recipes: a blur kernel of 10% of 32 px destroys most of the signal.

DINO uses multi-crop (Caron et al. 2021, Sec. 3.1 / Caron et al. 2020): two global views at
``data.image_size`` and N local views at ``dino.local_size`` from smaller crops; RGB images use
lightly's DINOTransform (blur off on small images, as above).

The 8x8 grey digits get their own small set: mildly resized crops and a small rotation.
Colour jitter, grey-scaling and flips make no sense for them (a flipped 2 is not a 2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform
from lightly.transforms.dino_transform import DINOTransform
from lightly.transforms.simclr_transform import SimCLRTransform
from torchvision import transforms as T
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ssl_ema.config_schema import Config

Transform = Callable[..., object]


def byol_rgb_views(image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Transform:
    """PIL image -> [view0, view1] with BYOL's two view distributions."""
    blur = 0.0 if image_size <= 64 else None  # None: keep BYOL's defaults (1.0 / 0.1)
    kw: dict[str, object] = {"input_size": image_size, "normalize": {"mean": mean, "std": std}}
    v1 = BYOLView1Transform(**kw, **({} if blur is None else {"gaussian_blur": blur}))
    v2_ = BYOLView2Transform(**kw, **({} if blur is None else {"gaussian_blur": blur}))
    return BYOLTransform(view_1_transform=v1, view_2_transform=v2_)


def simclr_rgb_views(image_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                     jitter_strength: float) -> Transform:
    """PIL image -> [view0, view1], both from SimCLR's distribution (lightly's SimCLRTransform;
    blur off on small images, as above)."""
    blur = {"gaussian_blur": 0.0} if image_size <= 64 else {}
    return SimCLRTransform(input_size=image_size, cj_strength=jitter_strength,
                           normalize={"mean": mean, "std": std}, **blur)


def dino_rgb_views(image_size: int, mean: tuple[float, ...], std: tuple[float, ...], *,
                   local_views: int, local_size: int, global_scale: tuple[float, float],
                   local_scale: tuple[float, float]) -> Transform:
    """PIL image -> [global0, global1, local0, ...] with DINO's view distributions."""
    blur = {"gaussian_blur": (0.0, 0.0, 0.0)} if image_size <= 64 else {}
    return DINOTransform(global_crop_size=image_size, global_crop_scale=global_scale,
                         local_crop_size=local_size, local_crop_scale=local_scale,
                         n_local_views=local_views, normalize={"mean": mean, "std": std}, **blur)


def rgb_eval(image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Transform:
    return T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor(),
                      T.Normalize(mean, std)])


class TwoViews:
    """Apply one (random) tensor transform twice to the same image."""

    def __init__(self, view: Transform):
        self.view = view

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.view(x), self.view(x)]  # type: ignore[list-item]


class MultiCrop:
    """Two global views, then ``n_local`` local views of the same image."""

    def __init__(self, global_view: Transform, local_view: Transform, n_local: int):
        self.global_view, self.local_view, self.n_local = global_view, local_view, n_local

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        views = [self.global_view(x), self.global_view(x)]
        return views + [self.local_view(x) for _ in range(self.n_local)]  # type: ignore[operator]


class DigitsView:
    """One mild digits view: resized to ``size``, a crop of ``scale`` of the area resized back,
    a rotation of up to 10 degrees (nearest, zero fill), normalised.

    An 8x8 digit fills its frame: a crop of half of it, shear or pixel noise on 64 pixels drop
    the strokes that tell classes apart, and BYOL or DINO then learns invariances that merge
    classes (docs/RESULTS.md, "BYOL quick start on digits"). So: mild crops,
    a small rotation, nothing else.

    The draws and pixels of ``v2.Compose([Resize, RandomResizedCrop, RandomAffine, Normalize])``
    (tests/test_data.py), with torchvision's kernels called directly: on 64 pixels the
    Compose's per-call dispatch (input flattening, type checks) costs more than the kernels,
    and the quick start spent most of its CPU time there (docs/RESULTS.md, "BYOL quick start on
    digits").
    """

    def __init__(self, size: int, scale: tuple[float, float], mean: float, std: float):
        self.size, self.mean, self.std = size, [mean], [std]
        self.crop = v2.RandomResizedCrop(size, scale=scale, ratio=(0.85, 1.18), antialias=True)
        self.rotate = v2.RandomAffine(degrees=10)

    def compose(self) -> v2.Compose:
        """The same view as a torchvision pipeline (the reference the tests compare with)."""
        return v2.Compose([v2.Resize(self.size, antialias=True), self.crop, self.rotate,
                           v2.Normalize(self.mean, self.std)])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = F.resize_image(x, [self.size], antialias=True)
        box = self.crop.make_params([x])
        x = F.resized_crop_image(x, **box, size=[self.size, self.size], antialias=True)
        turn = self.rotate.make_params([x])
        x = F.affine_image(x, **turn, interpolation=v2.InterpolationMode.NEAREST, fill=0.0)
        return F.normalize_image(x, mean=self.mean, std=self.std)


def digits_views(image_size: int, mean: float, std: float) -> Transform:
    """(1, 8, 8) float tensor in [0, 1] -> two augmented (1, S, S) BYOL views, 80-100% crops."""
    return TwoViews(DigitsView(image_size, (0.8, 1.0), mean, std))


def digits_multicrop(image_size: int, mean: float, std: float, *, local_views: int,
                     local_size: int, global_scale: tuple[float, float],
                     local_scale: tuple[float, float]) -> Transform:
    """Digits multi-crop: two global (1, S, S) views and ``local_views`` (1, s, s) views."""
    return MultiCrop(DigitsView(image_size, global_scale, mean, std),
                     DigitsView(local_size, local_scale, mean, std), local_views)


def digits_eval(image_size: int, mean: float, std: float) -> Transform:
    return v2.Compose([v2.Resize(image_size, antialias=True), v2.Normalize([mean], [std])])


def pair_views(cfg: Config, family: str, mean: Any, std: Any) -> Transform:
    """Two views of an image for BYOL-like methods: the digits pair, or the RGB pair that
    ``data.views`` names (BYOL's asymmetric pair, or SimCLR's)."""
    size = cfg.data.image_size
    if family == "digits":
        return digits_views(size, mean, std)
    if cfg.data.views == "simclr":
        return simclr_rgb_views(size, mean, std, cfg.data.jitter_strength)
    return byol_rgb_views(size, mean, std)
