"""Batched image augmentation on the accelerator: BYOL's and DINO's view distributions.

Why our own: lightly's transforms run image by image on PIL in loader workers. On CIFAR-10 that
caps lightly's BYOL benchmark at ~5.8k images/s on an H100 whose training step alone runs at ~30k
(../shared/GPU.md). Here a batch of uint8 images already on the device becomes a batch of views
in a few batched kernels, with per-sample parameters and no host sync.

Each op follows torchvision's definition, the reference the CPU path uses through lightly:
- crop: `RandomResizedCrop.get_params` (area in ``scale``, log-uniform aspect ratio, 10 tries,
  then a centre crop), resized bilinearly with half-pixel centres inside the crop (one
  `grid_sample`; several samples averaged per output pixel when a crop may shrink);
- `ColorJitter`: factors uniform in [max(0, 1 - s), 1 + s] (hue in [-h, h]), the four ops in a
  random order per image, each clamped to [0, 1] (`adjust_brightness/contrast/saturation/hue`);
- `RandomGrayscale` (ITU-R 601-2 luma), lightly's `GaussianBlur` (sigma uniform in ``sigma``;
  an exact separable Gaussian where PIL approximates one with box filters), lightly's
  `RandomSolarization` (PIL's `solarize` at 128 of 255), then `Normalize`.
`tests/test_gpu_augment.py` checks each op against torchvision and the sampled distributions
against lightly's transforms.

Parameters are drawn for a whole epoch at once on a CPU generator (`draw_params`) and gathered
per batch, so the views are a function of (seed, epoch, view, sample index): the same on CPU and
GPU, with one process or many, and after a resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_ema.config_schema import Config
from ssl_ema.precision import exact_fp32

# torchvision.transforms.functional.rgb_to_grayscale (ITU-R 601-2 luma, as PIL's "L" mode)
LUMA = (0.2989, 0.587, 0.114)
SOLARIZE_THRESHOLD = 128 / 255  # lightly's RandomSolarization -> PIL ImageOps.solarize(128)


@dataclass(frozen=True)
class ViewSpec:
    """One view's distribution, with lightly's BYOL view-1 defaults (Grill et al. 2020, Tab. 6)."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    jitter: float = 0.8  # probability of colour jitter
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale: float = 0.2
    blur: float = 0.0  # probability of Gaussian blur
    sigma: tuple[float, float] = (0.1, 2.0)
    solarize: float = 0.0


class ViewParams(NamedTuple):
    """Per-sample parameters of one view; every field has the sample index as first dim."""

    box: Tensor  # (N, 4) crop x1, y1, x2, y2 in pixels (integers, as torchvision's crop)
    flip: Tensor  # (N,) bool
    factors: Tensor  # (N, 4) brightness, contrast, saturation (1 = identity), hue shift (0)
    order: Tensor  # (N, 4) int64: a permutation of the four jitter ops
    gray: Tensor  # (N,) bool
    sigma: Tensor  # (N,) blur sigma, 0 = no blur
    solarize: Tensor  # (N,) bool

    def take(self, index: Tensor) -> ViewParams:
        return ViewParams(*(t[index] for t in self))

    def to(self, device: torch.device | str) -> ViewParams:
        return ViewParams(*(t.to(device, non_blocking=True) for t in self))


def _uniform(n: int, low: float, high: float, g: torch.Generator, *shape: int) -> Tensor:
    return low + (high - low) * torch.rand(n, *shape, generator=g, dtype=torch.float64)


class CropDraw(NamedTuple):
    """The uniform draws behind `n` crop boxes, before the image size is known (the JPEG
    pipeline learns each image's size only when it decodes it)."""

    scale: Tensor  # (n, 10) float64: torchvision's 10 tries at an area ...
    log_ratio: Tensor  # (n, 10) ... and a log aspect ratio
    top: Tensor  # (n,) position of the crop in the room left
    left: Tensor  # (n,)

    def take(self, index: Tensor) -> CropDraw:
        return CropDraw(*(t[index] for t in self))


def draw_crops(spec: ViewSpec, n: int, g: torch.Generator) -> CropDraw:
    log_ratio = (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    scale = _uniform(n, *spec.scale, g, 10)
    aspect = _uniform(n, *log_ratio, g, 10)
    top = torch.rand(n, generator=g, dtype=torch.float64)
    return CropDraw(scale, aspect, top, torch.rand(n, generator=g, dtype=torch.float64))


def place_crops(spec: ViewSpec, draw: CropDraw, height: Tensor | int, width: Tensor | int
                ) -> Tensor:
    """(n, 4) crop boxes x1, y1, x2, y2 of images ``height`` x ``width`` (one size, or (n,)
    sizes), as torchvision's ``RandomResizedCrop.get_params`` with these draws."""
    n = len(draw.top)
    h_img = torch.as_tensor(height, dtype=torch.float64).expand(n)
    w_img = torch.as_tensor(width, dtype=torch.float64).expand(n)
    target = (h_img * w_img)[:, None] * draw.scale  # (n, 10)
    aspect = torch.exp(draw.log_ratio)
    w = torch.round(torch.sqrt(target * aspect))  # round half to even, as Python's round
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= w_img[:, None]) & (h > 0) & (h <= h_img[:, None])
    first = ok.to(torch.int8).argmax(dim=1, keepdim=True)  # the first try that fits
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    # No try fits: torchvision's fallback, a centre crop with the ratio clamped into range.
    in_ratio = w_img / h_img
    narrow, wide = in_ratio < spec.ratio[0], in_ratio > spec.ratio[1]
    fw = torch.where(wide, torch.round(h_img * spec.ratio[1]), w_img)
    fh = torch.where(narrow, torch.round(w_img / spec.ratio[0]), h_img)
    fits = ok.any(dim=1)
    w, h = torch.where(fits, w, fw), torch.where(fits, h, fh)
    i = torch.floor(draw.top * (h_img - h + 1))
    j = torch.floor(draw.left * (w_img - w + 1))
    i = torch.where(fits, i, torch.div(h_img - fh, 2, rounding_mode="floor"))
    j = torch.where(fits, j, torch.div(w_img - fw, 2, rounding_mode="floor"))
    return torch.stack([j, i, j + w, i + h], dim=1).float()


def crop_boxes(spec: ViewSpec, n: int, height: int, width: int, g: torch.Generator) -> Tensor:
    """(n, 4) crop boxes, distributed as torchvision's ``RandomResizedCrop.get_params``."""
    return place_crops(spec, draw_crops(spec, n, g), height, width)


def draw_colour(spec: ViewSpec, n: int, g: torch.Generator) -> ViewParams:
    """Everything but the crop of ``n`` views (``box`` left empty): flip, jitter, grey, blur,
    solarisation, drawn on ``g`` after the crop's draws."""
    flip = torch.rand(n, generator=g) < spec.hflip
    jitter = torch.rand(n, generator=g) < spec.jitter
    factors = torch.stack([
        _uniform(n, max(0.0, 1 - spec.brightness), 1 + spec.brightness, g),
        _uniform(n, max(0.0, 1 - spec.contrast), 1 + spec.contrast, g),
        _uniform(n, max(0.0, 1 - spec.saturation), 1 + spec.saturation, g),
        _uniform(n, -spec.hue, spec.hue, g),
    ], dim=1).float()
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0])
    factors = torch.where(jitter[:, None], factors, identity)  # RandomApply(p=spec.jitter)
    order = torch.rand(n, 4, generator=g).argsort(dim=1)  # ColorJitter's randperm(4), per image
    gray = torch.rand(n, generator=g) < spec.grayscale
    blur = torch.rand(n, generator=g) < spec.blur
    sigma = torch.where(blur, _uniform(n, *spec.sigma, g).float(), 0.0)
    solarize = torch.rand(n, generator=g) < spec.solarize
    return ViewParams(torch.zeros(n, 4), flip, factors, order, gray, sigma, solarize)


def draw_params(spec: ViewSpec, n: int, height: int, width: int, g: torch.Generator) -> ViewParams:
    """Parameters of ``n`` views (one per sample) drawn on the CPU generator ``g``."""
    box = crop_boxes(spec, n, height, width, g)
    return draw_colour(spec, n, g)._replace(box=box)


# ------------------------------------------------------------------------------- colour ops
def _gray(x: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    r, g, b = x.unbind(dim=1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """torchvision's ``_blend``: factor * x + (1 - factor) * other, clamped to [0, 1]."""
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, _gray(x), factor)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate hue by ``shift`` (fraction of a turn) per image: RGB -> HSV -> RGB as torchvision."""
    r, g, b = x.unbind(dim=1)  # (B, H, W) each
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + shift.view(-1, 1, 1), 1.0)
    # HSV -> RGB (torchvision's _hsv2rgb)
    v = maxc
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    mask = i.unsqueeze(1) == torch.arange(6, device=x.device).view(1, -1, 1, 1)  # (B, 6, H, W)
    table = torch.stack([  # (B, 3, 6, H, W): the (r, g, b) of each sextant
        torch.stack([v, q, p, p, t, v], dim=1),
        torch.stack([t, v, v, q, p, p], dim=1),
        torch.stack([p, p, t, v, v, q], dim=1),
    ], dim=1)
    return (table * mask.unsqueeze(1)).sum(dim=2)


def color_jitter(x: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """ColorJitter with per-image factors (B, 4) applied in a per-image order (B, 4).

    Without a host sync every op runs on the whole batch, with the identity factor for the
    images whose op at that position is another one (brightness/contrast/saturation at 1 are
    exact identities). Hue, the costly op (an HSV round trip), runs once: the cheap ops that
    come before it in an image's order, then hue, then those after it. Hue is kept only where
    its shift is non-zero, so an image the jitter skipped (RandomApply) is left exactly as is.
    """
    one = torch.ones_like(factors[:, 0])
    hue_pos = (order == 3).to(torch.int64).argmax(dim=1)  # (B,) where hue sits in each order

    def cheap_ops(x: Tensor, positions: range, keep: Callable[[int], Tensor]) -> Tensor:
        for pos in positions:
            op, here = order[:, pos], keep(pos)
            x = adjust_brightness(x, torch.where(here & (op == 0), factors[:, 0], one))
            x = adjust_contrast(x, torch.where(here & (op == 1), factors[:, 1], one))
            x = adjust_saturation(x, torch.where(here & (op == 2), factors[:, 2], one))
        return x

    # Positions 0-2 can come before hue, 1-3 after it.
    x = cheap_ops(x, range(3), lambda pos: pos < hue_pos)
    shift = factors[:, 3]
    x = torch.where((shift != 0).view(-1, 1, 1, 1), adjust_hue(x, shift), x)
    return cheap_ops(x, range(1, 4), lambda pos: pos > hue_pos)


@exact_fp32()  # fp32 convolutions, not TF32: the views are the same on every device
def gaussian_blur(x: Tensor, sigma: Tensor, max_sigma: float) -> Tensor:
    """Separable Gaussian blur with a per-image sigma (0 = unchanged), reflect padding."""
    b, c, h, w = x.shape
    radius = min(math.ceil(3 * max_sigma), h - 1, w - 1)
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)  # (K,)
    s = sigma.to(x.dtype).clamp_min(1e-6).view(-1, 1)
    kernel = torch.exp(-0.5 * (t / s) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = torch.where((sigma > 0).view(-1, 1), kernel, (t == 0).to(x.dtype))  # (B, K)
    kernel = kernel.repeat_interleave(c, dim=0)  # (B*C, K): one depthwise filter per channel
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel.view(b * c, 1, 1, -1),
                 groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel.view(b * c, 1, -1, 1),
                 groups=b * c)
    return y.view(b, c, h, w)


# ------------------------------------------------------------------------------- one view
def resized_crop(images: Tensor, box: Tensor, size: int) -> Tensor:
    """uint8/float (B, C, H, W) + boxes (B, 4) -> float (B, C, size, size) in [0, 1].

    As torchvision's crop-then-resize: bilinear with half-pixel centres, sample positions clamped
    to the crop (no bleeding from outside it). Where a crop may shrink, each output pixel averages
    k x k bilinear samples, k = ceil(image side / size) (static: no host sync), as an antialiased
    resize does; k = 1 (CIFAR's crops only grow) is exactly torchvision's bilinear resize.
    """
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    _, _, h, w = x.shape
    k = max(1, math.ceil(max(h, w) / size))
    steps = (torch.arange(size * k, device=x.device, dtype=x.dtype) + 0.5) / k  # (S*k,)
    x1, y1, x2, y2 = (c.unsqueeze(1) for c in box.to(x.dtype).unbind(dim=1))  # (B, 1) each
    px = (x1 + steps * (x2 - x1) / size - 0.5).clamp(x1, x2 - 1)  # (B, S*k) pixel coordinates
    py = (y1 + steps * (y2 - y1) / size - 0.5).clamp(y1, y2 - 1)
    gx, gy = (2 * px + 1) / w - 1, (2 * py + 1) / h - 1  # grid_sample's align_corners=False
    grid = torch.stack(torch.broadcast_tensors(gx.unsqueeze(1), gy.unsqueeze(2)), dim=-1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return F.avg_pool2d(out, k) if k > 1 else out


def colour(x: Tensor, p: ViewParams, spec: ViewSpec, mean: Tensor, std: Tensor) -> Tensor:
    """Everything after the crop: flip, jitter, grayscale, blur, solarise, normalise."""
    x = torch.where(p.flip.view(-1, 1, 1, 1), x.flip(-1), x)
    if spec.jitter > 0:
        x = color_jitter(x, p.factors, p.order)
    if spec.grayscale > 0:
        x = torch.where(p.gray.view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
    if spec.blur > 0:
        x = gaussian_blur(x, p.sigma, spec.sigma[1])
    if spec.solarize > 0:
        x = torch.where(p.solarize.view(-1, 1, 1, 1) & (x >= SOLARIZE_THRESHOLD), 1 - x, x)
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def augment(images: Tensor, p: ViewParams, spec: ViewSpec, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 (B, C, H, W) + this batch's parameters -> normalised float views (B, C, S, S)."""
    return colour(resized_crop(images, p.box, spec.size), p, spec, mean, std)


# ------------------------------------------------------------------------------- recipes
def byol_specs(image_size: int) -> tuple[ViewSpec, ViewSpec]:
    """lightly's BYOLView1/2Transform; blur off on images <= 64 px, as the CPU views."""
    small = image_size <= 64
    return (ViewSpec(image_size, blur=0.0 if small else 1.0),
            ViewSpec(image_size, blur=0.0 if small else 0.1, solarize=0.2))


def simclr_specs(image_size: int, jitter_strength: float) -> tuple[ViewSpec, ViewSpec]:
    """lightly's SimCLRTransform: both views alike, jitter 0.8/0.8/0.8/0.2 x strength, blur 0.5
    (off on images <= 64 px, as the CPU views), no solarisation."""
    s = jitter_strength
    spec = ViewSpec(image_size, brightness=0.8 * s, contrast=0.8 * s, saturation=0.8 * s,
                    hue=0.2 * s, blur=0.0 if image_size <= 64 else 0.5)
    return spec, spec


def dino_specs(image_size: int, local_size: int, local_views: int,
               global_scale: tuple[float, float], local_scale: tuple[float, float]
               ) -> tuple[ViewSpec, ...]:
    """lightly's DINOTransform: two global views, then ``local_views`` local views."""
    small = image_size <= 64
    g0 = ViewSpec(image_size, scale=global_scale, blur=0.0 if small else 1.0)
    g1 = ViewSpec(image_size, scale=global_scale, blur=0.0 if small else 0.1, solarize=0.2)
    local = ViewSpec(local_size, scale=local_scale, blur=0.0 if small else 0.5)
    return (g0, g1, *([local] * local_views))


def pair_specs(cfg: Config) -> tuple[ViewSpec, ViewSpec]:
    """The device pipeline's view pair that ``data.views`` names (`views.pair_views`)."""
    if cfg.data.views == "simclr":
        return simclr_specs(cfg.data.image_size, cfg.data.jitter_strength)
    return byol_specs(cfg.data.image_size)
