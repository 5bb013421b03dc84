"""The device views against their reference: torchvision's ops and lightly's view distributions."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from lightly.transforms.byol_transform import BYOLView1Transform, BYOLView2Transform
from lightly.transforms.dino_transform import DINOTransform
from lightly.transforms.gaussian_blur import GaussianBlur
from lightly.transforms.simclr_transform import SimCLRTransform
from lightly.transforms.solarize import RandomSolarization
from PIL import Image

from ssl_ema.data import gpu_augment as A

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, grid, right=True) / len(a)
    cdf_b = torch.searchsorted(b, grid, right=True) / len(b)
    return float((cdf_a - cdf_b).abs().max())


def ks_critical(n: int, m: int, alpha_coefficient: float = 1.95) -> float:
    """KS rejection threshold at alpha = 0.001 (c = 1.95) for sample sizes n and m."""
    return alpha_coefficient * ((n + m) / (n * m)) ** 0.5


def test_colour_ops_match_torchvision() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 12, 10, generator=g)
    factor = torch.tensor([0.0, 0.6, 0.9, 1.0, 1.3, 1.4])
    shift = torch.tensor([-0.5, -0.1, 0.0, 0.03, 0.1, 0.5])
    cases = [(A.adjust_brightness, TF.adjust_brightness, factor),
             (A.adjust_contrast, TF.adjust_contrast, factor),
             (A.adjust_saturation, TF.adjust_saturation, factor),
             (A.adjust_hue, TF.adjust_hue, shift)]
    for ours, ref, f in cases:
        want = torch.stack([ref(x[i], float(f[i])) for i in range(len(x))])
        torch.testing.assert_close(ours(x, f), want, atol=2e-6, rtol=0)
    sigma = torch.tensor([0.0, 0.3, 0.7, 1.0, 1.5, 2.0])
    blurred = A.gaussian_blur(x, sigma, max_sigma=2.0)
    for i, s in enumerate(sigma.tolist()):  # kernel 2 * ceil(3 * 2) + 1 = 13 taps
        want = x[i] if s == 0 else TF.gaussian_blur(x[i], [13, 13], [s, s])
        torch.testing.assert_close(blurred[i], want, atol=1e-5, rtol=0)


def test_colour_jitter_applies_the_ops_in_each_images_order() -> None:
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    factors = torch.tensor([[1.3, 0.7, 1.2, 0.05]] * 4)
    orders = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]])
    ops = [lambda im: TF.adjust_brightness(im, 1.3), lambda im: TF.adjust_contrast(im, 0.7),
           lambda im: TF.adjust_saturation(im, 1.2), lambda im: TF.adjust_hue(im, 0.05)]
    got = A.color_jitter(x, factors, orders)
    for i, order in enumerate(orders.tolist()):
        want = x[i]
        for op in order:
            want = ops[op](want)
        torch.testing.assert_close(got[i], want, atol=2e-6, rtol=0)
    # An image the jitter skipped (RandomApply: identity factors) is left exactly unchanged.
    identity = torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 4)
    assert torch.equal(A.color_jitter(x, identity, orders), x)


@pytest.mark.parametrize("shape", [(32, 32), (24, 40)])
def test_crop_boxes_are_distributed_as_torchvision(shape: tuple[int, int]) -> None:
    h, w = shape
    spec = A.ViewSpec(32)
    ours = A.crop_boxes(spec, 20000, h, w, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    ref = torch.tensor([T.RandomResizedCrop.get_params(torch.zeros(1, h, w), spec.scale,
                                                       spec.ratio) for _ in range(4000)]).float()
    # (i, j, h, w) from torchvision; our boxes are (x1, y1, x2, y2)
    stats_ours = [ours[:, 1], ours[:, 0], ours[:, 3] - ours[:, 1], ours[:, 2] - ours[:, 0]]
    limit = ks_critical(len(ours), len(ref))
    for name, a, b in zip("ijhw", stats_ours, ref.unbind(1)):
        assert ks_statistic(a, b) < limit, name
    assert (ours[:, 2] <= w).all() and (ours[:, 3] <= h).all() and (ours >= 0).all()


def test_resized_crop_of_the_whole_image_is_the_image() -> None:
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    box = torch.tensor([[0.0, 0.0, 8.0, 8.0], [2.0, 2.0, 6.0, 6.0]])
    out = A.resized_crop(x, box, 8)
    torch.testing.assert_close(out[0], x[0].float() / 255)
    # a 4x4 crop upscaled to 8x8 as torchvision's bilinear resize (half-pixel centres)
    want = TF.resize(x[1, :, 2:6, 2:6].float() / 255, [8, 8], antialias=False)
    torch.testing.assert_close(out[1], want, atol=1e-6, rtol=0)
    # a shrinking crop (16 -> 8, of a 32 px image: 4 x 4 samples per pixel) ~ antialiased resize
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = TF.gaussian_blur(x, [7, 7], [1.5, 1.5])  # smooth: the two filters differ only slightly
    out = A.resized_crop(x, torch.tensor([[4.0, 8.0, 20.0, 24.0]]), 8)
    want = TF.resize(x[..., 8:24, 4:20], [8, 8], antialias=True)
    assert float((out - want).abs().max()) < 0.02


def _picture(size: int = 32) -> Image.Image:
    """A fixed smooth colour picture with texture, so every op changes the statistics."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(0)
    rgb = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx * yy)], axis=-1) * 200 + 30
    rgb = rgb + rng.normal(0, 12, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def _summaries(views: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-view statistics (N,) each: channel means, spread, and a left-right asymmetry."""
    return {"red": views[:, 0].mean((1, 2)), "green": views[:, 1].mean((1, 2)),
            "blue": views[:, 2].mean((1, 2)), "std": views.std((1, 2, 3)),
            "left_minus_right": views[..., :16].mean((1, 2, 3)) - views[..., 16:].mean((1, 2, 3))}


@pytest.mark.parametrize("view", [0, 1])
def test_views_are_distributed_as_lightlys(view: int) -> None:
    """BYOL's two view distributions (32 px: no blur; view 1 solarises) against lightly's."""
    n = 1500
    image = _picture()
    reference = (BYOLView1Transform, BYOLView2Transform)[view](
        input_size=32, gaussian_blur=0.0, normalize={"mean": MEAN, "std": STD})
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    theirs = torch.stack([reference(image) for _ in range(n)])
    spec = A.byol_specs(32)[view]
    g = torch.Generator().manual_seed(0)
    params = A.draw_params(spec, n, 32, 32, g)
    batch = TF.pil_to_tensor(image).expand(n, -1, -1, -1)
    ours = A.augment(batch, params, spec, torch.tensor(MEAN), torch.tensor(STD))
    limit = ks_critical(n, n)
    for name, a in _summaries(ours).items():
        assert ks_statistic(a, _summaries(theirs)[name]) < limit, name
    # grey views: all channels equal once normalisation is undone
    def grey(v: torch.Tensor) -> torch.Tensor:
        raw = v * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
        return ((raw[:, 0] - raw[:, 1]).abs().amax((1, 2)) < 0.01).float()
    assert abs(float(grey(ours).mean() - grey(theirs).mean())) < 0.05


def _lightly_spec(view: object) -> dict[str, object]:
    """The distribution parameters inside a lightly view transform (its torchvision Compose)."""
    out: dict[str, object] = {}
    for t in view.transform.transforms:  # type: ignore[attr-defined]
        name = type(t).__name__  # lightly picks torchvision's v1 or v2 transforms
        if name == "RandomResizedCrop":
            out.update(size=t.size[0], scale=t.scale, ratio=t.ratio)
        elif name == "RandomHorizontalFlip":
            out["hflip"] = t.p
        elif name == "RandomApply" and type(t.transforms[0]).__name__ == "ColorJitter":
            cj = t.transforms[0]
            out.update(jitter=t.p, brightness=cj.brightness[1] - 1, contrast=cj.contrast[1] - 1,
                       saturation=cj.saturation[1] - 1, hue=cj.hue[1])
        elif name == "RandomGrayscale":
            out["grayscale"] = t.p
        elif isinstance(t, GaussianBlur):
            out.update(blur=t.prob, sigma=tuple(t.sigmas))
        elif isinstance(t, RandomSolarization):
            out["solarize"] = t.prob
            assert t.threshold == 128
    return out


def _rounded(spec: dict[str, object]) -> dict[str, tuple[float, ...]]:
    return {k: tuple(round(float(x), 6) for x in (v if isinstance(v, tuple | list) else (v,)))
            for k, v in spec.items()}


def _ours(spec: A.ViewSpec) -> dict[str, tuple[float, ...]]:
    keys = ("size", "scale", "ratio", "hflip", "jitter", "brightness", "contrast", "saturation",
            "hue", "grayscale", "blur", "sigma", "solarize")
    return _rounded({k: getattr(spec, k) for k in keys})


@pytest.mark.parametrize("size", [32, 224])
def test_specs_mirror_lightlys_transforms(size: int) -> None:
    blur = {"gaussian_blur": 0.0} if size <= 64 else {}
    for spec, view in zip(A.byol_specs(size), (BYOLView1Transform(input_size=size, **blur),
                                               BYOLView2Transform(input_size=size, **blur))):
        assert _ours(spec) == _rounded(_lightly_spec(view))
    dino_blur = {"gaussian_blur": (0.0, 0.0, 0.0)} if size <= 64 else {}
    dino = DINOTransform(global_crop_size=size, local_crop_size=size // 2, n_local_views=3,
                         **dino_blur)
    ours = A.dino_specs(size, size // 2, 3, (0.4, 1.0), (0.05, 0.4))
    assert len(ours) == len(dino.transforms) == 5
    for spec, view in zip(ours, dino.transforms):
        assert _ours(spec) == _rounded(_lightly_spec(view))
    simclr = SimCLRTransform(input_size=size, cj_strength=0.5, **blur)  # lightly's benchmarks
    for spec, view in zip(A.simclr_specs(size, 0.5), simclr.transforms, strict=True):
        assert _ours(spec) == _rounded({"solarize": 0.0, **_lightly_spec(view)})  # none in SimCLR
