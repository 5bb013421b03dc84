"""RandAugment on a batch, one op sequence per image: the strong views of the device pipeline.

The loader pipeline's strong view (FixMatch, Sohn et al. 2020, Sec. 2.3 and App. D; see
`classify_views`) applies torchvision's ``v2.RandAugment(num_ops, magnitude)`` image by image:
``num_ops`` ops drawn uniformly with replacement from 14 (identity, shear x/y, translate x/y,
rotate, brightness, colour, contrast, sharpness, posterize, solarize, autocontrast, equalize),
all at one magnitude bin of 31, signed ops negated with probability 1/2, geometric ops with
nearest interpolation and fill 0. FixMatch's own RandAugment draws a magnitude per op instead;
we follow torchvision, so that both pipelines draw from one distribution.

Here the same ops run on a whole batch at once: images are floats holding uint8 values
(0..255), each op is computed for the batch and kept where an image drew it (no host sync), the
geometric ops as one ``grid_sample`` per op position with torchvision's inverse affine matrix,
and every op rounds as torchvision's uint8 kernel does (``tests/test_gpu_randaugment.py``
checks each op against ``torchvision.transforms.v2.functional`` on uint8 images).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_ema.precision import exact_fp32

OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
       "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
SIGNED = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
                    "Color", "Contrast", "Sharpness"})
NUM_BINS = 31  # torchvision's num_magnitude_bins
LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def magnitudes(magnitude: int, height: int, width: int) -> Tensor:
    """(14,) each op's magnitude at bin ``magnitude``: torchvision's _AUGMENTATION_SPACE."""
    i, top = magnitude, NUM_BINS - 1
    lin = {"ShearX": 0.3, "ShearY": 0.3, "TranslateX": 150.0 / 331.0 * width,
           "TranslateY": 150.0 / 331.0 * height, "Rotate": 30.0, "Brightness": 0.9,
           "Color": 0.9, "Contrast": 0.9, "Sharpness": 0.9}
    out = [lin[op] * i / top if op in lin else 0.0 for op in OPS]
    out[OPS.index("Posterize")] = float(8 - round(i / (top / 4)))
    out[OPS.index("Solarize")] = 1.0 - i / top
    # torch.linspace computes the bins in float32: match it
    return torch.tensor(out, dtype=torch.float32)


def draw_ops(n: int, num_ops: int, magnitude: int, height: int, width: int,
             g: torch.Generator) -> tuple[Tensor, Tensor]:
    """(n, num_ops) op indices and their signed magnitudes, drawn on the CPU generator."""
    op = torch.randint(len(OPS), (n, num_ops), generator=g)
    signed = torch.tensor([o in SIGNED for o in OPS])[op]
    flip = signed & (torch.rand(n, num_ops, generator=g) <= 0.5)
    value = magnitudes(magnitude, height, width)[op]
    return op, torch.where(flip, -value, value)


# ---------------------------------------------------------------------------- geometric ops
def _inverse_affine(angle: Tensor, translate: Tensor, shear: Tensor, center: Tensor) -> Tensor:
    """(B, 2, 3) torchvision's ``_get_inverse_affine_matrix`` (scale 1), degrees in."""
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear[:, 0]), torch.deg2rad(shear[:, 1])
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
    cx, cy = center.unbind(1)
    tx, ty = translate.unbind(1)
    m2 = d * (-cx - tx) + (-b) * (-cy - ty) + cx
    m5 = (-c) * (-cx - tx) + a * (-cy - ty) + cy
    return torch.stack([torch.stack([d, -b, m2], 1), torch.stack([-c, a, m5], 1)], 1)


def geometric(x: Tensor, op: Tensor, value: Tensor) -> Tensor:
    """Shear, translate and rotate, each image by its own op (others unchanged): one sample."""
    b, _, h, w = x.shape
    name = {o: op == OPS.index(o) for o in ("ShearX", "ShearY", "TranslateX", "TranslateY",
                                             "Rotate")}
    zero = torch.zeros_like(value, dtype=torch.float64)
    v = value.double()
    shear_deg = torch.rad2deg(torch.atan(v))
    shear = torch.stack([torch.where(name["ShearX"], shear_deg, zero),
                         torch.where(name["ShearY"], shear_deg, zero)], 1)
    shift = torch.trunc(v)  # torchvision: int(magnitude)
    translate = torch.stack([torch.where(name["TranslateX"], shift, zero),
                             torch.where(name["TranslateY"], shift, zero)], 1)
    angle = torch.where(name["Rotate"], -v, zero)  # F.rotate passes -angle
    # shears turn about the top-left corner (center=[0, 0]); the rest about the centre
    corner = torch.tensor([-0.5 * w, -0.5 * h], dtype=torch.float64, device=x.device)
    is_shear = (name["ShearX"] | name["ShearY"]).unsqueeze(1)
    center = torch.where(is_shear, corner, torch.zeros_like(corner))
    theta = _inverse_affine(angle, translate, shear, center).float()  # (B, 2, 3)
    # torchvision's _affine_grid (pixel centres relative to the image centre, base @ theta^T),
    # written elementwise: the same fp32 values as its bmm on the CPU, and on a GPU too, where
    # a matmul may round its inputs to TF32 and move a nearest sample (`ssl_ema.precision`).
    xs = torch.linspace(-0.5 * w + 0.5, 0.5 * w - 0.5, w, device=x.device).view(1, 1, w)
    ys = torch.linspace(-0.5 * h + 0.5, 0.5 * h - 0.5, h, device=x.device).view(1, h, 1)
    t = theta.view(b, 6, 1, 1).unbind(1)
    grid = torch.stack([(t[0] * xs + t[1] * ys + t[2]) / (0.5 * w),
                        (t[3] * xs + t[4] * ys + t[5]) / (0.5 * h)], -1)  # (B, H, W, 2)
    out = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    moved = torch.stack(list(name.values())).any(0).view(-1, 1, 1, 1)
    return torch.where(moved, out, x)


# ---------------------------------------------------------------------------- colour ops
def _gray(x: Tensor) -> Tensor:
    """(B, 1, H, W) floor of the luma, as torchvision's uint8 kernels use it."""
    r, g, b = x.unbind(1)
    return r.mul(LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).floor_().unsqueeze(1)


def _alpha(factor: Tensor) -> Tensor:
    """(B, 1, 1, 1) float32 1 - factor, from the float64 factor (torchvision's Python float)."""
    return (1.0 - factor).float().view(-1, 1, 1, 1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """torchvision's uint8 ``_blend``: clamp, then truncate to an integer. ``factor``: float64."""
    return (x * factor.float().view(-1, 1, 1, 1) + other * _alpha(factor)).clamp(0, 255).floor()


def brightness(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, torch.zeros_like(x), f)


def saturation(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, _gray(x), f) if x.shape[1] == 3 else x


def contrast(x: Tensor, f: Tensor) -> Tensor:
    gray = _gray(x) if x.shape[1] == 3 else x
    return _blend(x, gray.mean(dim=(1, 2, 3), keepdim=True), f)


@exact_fp32()
def sharpness(x: Tensor, f: Tensor) -> Tensor:
    """A 3x3 smoothing (1s around a 5) blended in; the border pixels are kept."""
    c = x.shape[1]
    kernel = torch.full((3, 3), 1.0 / 13.0, device=x.device, dtype=x.dtype)
    kernel[1, 1] = 5.0 / 13.0
    smooth = F.conv2d(x, kernel.expand(c, 1, 3, 3), groups=c).round()
    inner = x[..., 1:-1, 1:-1]
    inner = (inner + _alpha(f) * (smooth - inner)).clamp(0, 255).floor()
    return F.pad(inner, (1, 1, 1, 1)) + x - F.pad(x[..., 1:-1, 1:-1], (1, 1, 1, 1))


def posterize(x: Tensor, bits: Tensor) -> Tensor:
    step = torch.exp2(8 - bits).view(-1, 1, 1, 1)  # keep the top ``bits`` bits
    return torch.floor(x / step) * step


def solarize(x: Tensor, threshold: Tensor) -> Tensor:
    return torch.where(x >= 255.0 * threshold.view(-1, 1, 1, 1), 255.0 - x, x)


def autocontrast(x: Tensor) -> Tensor:
    low, high = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    flat = high == low
    scale = torch.where(flat, 1.0, (high - low) * (1.0 / 255.0))
    return ((x - torch.where(flat, 0.0, low)) / scale).clamp(0, 255).floor()


def equalize(x: Tensor) -> Tensor:
    """Per channel, PIL's histogram equalisation (torchvision's ``equalize_image``)."""
    b, c, h, w = x.shape
    flat = x.reshape(b * c, h * w).long()
    hist = torch.zeros(b * c, 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    cum = hist.cumsum(1)
    last = hist.gather(1, cum.argmax(1, keepdim=True))  # count of the largest value present
    step = torch.div(h * w - last, 255, rounding_mode="floor")
    lut = torch.div(cum[:, :-1] + step // 2, step.clamp(min=1), rounding_mode="floor")
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut.clamp(0, 255)], 1)
    out = lut.gather(1, flat).to(x.dtype).view(b, c, h, w)
    return torch.where((step != 0).view(b, c, 1, 1), out, x)


def photometric(x: Tensor, op: Tensor, value: Tensor) -> Tensor:
    """The colour ops, each image by its own op (others unchanged)."""
    one = 1.0 + value.double()  # factors in float64, as torchvision's Python floats
    results = {"Brightness": lambda: brightness(x, one), "Color": lambda: saturation(x, one),
               "Contrast": lambda: contrast(x, one), "Sharpness": lambda: sharpness(x, one),
               "Posterize": lambda: posterize(x, value), "Solarize": lambda: solarize(x, value),
               "AutoContrast": lambda: autocontrast(x), "Equalize": lambda: equalize(x)}
    for name, result in results.items():
        x = torch.where((op == OPS.index(name)).view(-1, 1, 1, 1), result(), x)
    return x


def rand_augment(x: Tensor, op: Tensor, value: Tensor) -> Tensor:
    """Float (B, C, H, W) holding uint8 values + (B, num_ops) ops and signed magnitudes."""
    for k in range(op.shape[1]):
        x = photometric(geometric(x, op[:, k], value[:, k]), op[:, k], value[:, k])
    return x
