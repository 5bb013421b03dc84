#!/usr/bin/env python
"""How much the device views depend on float rounding: the bound behind the CUDA view tests.

    python tools/view_precision.py [--images 2000] [--size 32] [--seeds 3] [--json PATH]

The views make discrete decisions from float values: nearest sampling (RandAugment's geometric
ops), ``floor`` of uint8-valued blends, ``round`` of the sharpness smoothing. Two correct fp32
implementations (a CPU and a GPU: fused multiply-adds, another summation order) may round one
such value differently by an ulp or two, and flip a decision that sits that close to its
boundary. Measured on this device, on random uint8 images, over ``--seeds`` epochs' draws:

- ``ulp``: every value entering such a decision that is not already on a boundary is moved by
  ±2 ulps (random sign), as another device's rounding could; per view, the fraction of values
  that change by more than 1e-4 and the largest change. This is the share of a CPU-GPU
  difference that fp32 itself allows; tests/test_device_classify.py's CUDA test is held to it.
- ``tf32``: the inputs of the views' convolutions (sharpness, blur) and of the geometric grid's
  product rounded to TF32's 10 mantissa bits (round to nearest), as a GPU with TF32 on computes
  them: what the views moved by before `ssl_ema.precision.exact_fp32` (and what TF32 would still
  move if it were allowed there).
Each figure is the largest over the seeds.
On a CUDA machine (``--device cuda``) also ``cuda_vs_cpu``: the fraction of values that differ
between the same views made there and on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ssl_ema.data import gpu_augment, gpu_randaugment
from ssl_ema.data.device_classify import ClassifySpec, draw_classify, make_view

MEAN, STD = (0.491, 0.482, 0.447), (0.247, 0.243, 0.262)
STRONG = ClassifySpec(32, num_ops=2, magnitude=10)


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest value with a 10-bit mantissa (TF32's inputs), ties away from zero."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _nudge(x: torch.Tensor, ulps: int, g: torch.Generator, on_boundary: torch.Tensor
           ) -> torch.Tensor:
    """``x`` moved by ``ulps`` ulps in a random direction, except where ``on_boundary``."""
    sign = torch.randint(0, 2, x.shape, generator=g).to(x.device).bool()
    target = torch.where(sign, torch.full_like(x, float("inf")), torch.full_like(x, -float("inf")))
    y = x
    for _ in range(ulps):
        y = torch.nextafter(y, target)
    return torch.where(on_boundary, x, y)


class Perturb(TorchFunctionMode):
    """Moves the inputs of floor/round/nearest grid_sample by ``ulps`` ulps (see the docstring)."""

    def __init__(self, ulps: int, seed: int):
        super().__init__()
        self.ulps, self.g = ulps, torch.Generator().manual_seed(seed)

    def __torch_function__(self, func: Callable, types: Any, args: Sequence = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("floor", "floor_") and args[0].is_floating_point():
            x = args[0]
            args = (_nudge(x, self.ulps, self.g, x == torch.floor(x)), *args[1:])
            if name == "floor_":  # in place on a fresh tensor: same result as out of place
                return torch.floor(args[0])
        elif name == "round" and args[0].is_floating_point():
            x = args[0]
            args = (_nudge(x, self.ulps, self.g, (x - torch.floor(x)) == 0.5), *args[1:])
        elif func is F.grid_sample and kwargs.get("mode", args[2] if len(args) > 2 else "") \
                == "nearest":
            grid = kwargs.pop("grid") if "grid" in kwargs else args[1]
            args = (args[0], _nudge(grid, self.ulps, self.g, torch.zeros_like(grid).bool()),
                    *args[2:])
        return func(*args, **kwargs)


class TF32(TorchFunctionMode):
    """conv2d's input and weight rounded to TF32 (products and sums stay fp32)."""

    def __torch_function__(self, func: Callable, types: Any, args: Sequence = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.conv2d:
            args = (round_tf32(args[0]), round_tf32(args[1]), *args[2:])
        return func(*args, **kwargs)


def tf32_theta(inverse_affine: Callable) -> Callable:
    def rounded(*args: Any) -> torch.Tensor:  # the grid's matmul read theta as TF32
        return round_tf32(inverse_affine(*args).float()).double()
    return rounded


def views(x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Strong classification views and BYOL's two views of ``x`` (uint8), seeded; BYOL's with
    its ImageNet blur (probability 1 and 0.1: CIFAR's views have none), at ``x``'s size."""
    g = torch.Generator().manual_seed(seed)
    p = draw_classify(STRONG, len(x), g).to(x.device)
    mean, std = torch.tensor(MEAN, device=x.device), torch.tensor(STD, device=x.device)
    out = {"strong": make_view(x, p, STRONG, mean, std)}
    for i, (spec, blur) in enumerate(zip(gpu_augment.byol_specs(x.shape[-1]), (1.0, 0.1))):
        spec = replace(spec, blur=blur)
        vp = gpu_augment.draw_params(spec, len(x), x.shape[-2], x.shape[-1], g).to(x.device)
        out[f"byol{i}"] = gpu_augment.augment(x, vp, spec, mean, std)
    return out


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per view: [fraction of values that differ by more than 1e-4, largest difference]
    (normalised units; one uint8 level is 1/255/std ≈ 0.016)."""
    out = {}
    for k in a:
        diff = (a[k] - b[k].to(a[k].device)).abs()
        out[k] = [float((diff > 1e-4).float().mean()), float(diff.max())]
    return out


def measure(images: int, size: int, seeds: int, device: str) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (images, 3, size, size), dtype=torch.uint8, generator=g)
    out: dict[str, Any] = {"images": images, "size": size, "seeds": seeds, "ulp": {},
                           "tf32": {}}
    for seed in range(seeds):
        plain = views(x, seed)
        with Perturb(2, seed):
            nudged = views(x, seed)
        original = gpu_randaugment._inverse_affine
        gpu_randaugment._inverse_affine = tf32_theta(original)  # type: ignore[assignment]
        try:
            with TF32():
                tf32 = views(x, seed)
        finally:
            gpu_randaugment._inverse_affine = original  # type: ignore[assignment]
        results = [("ulp", changed(plain, nudged)), ("tf32", changed(plain, tf32))]
        if device == "cuda":
            results.append(("cuda_vs_cpu", changed(plain, views(x.cuda(), seed))))
        for key, result in results:  # the largest over the seeds
            for view, (frac, largest) in result.items():
                old = out.setdefault(key, {}).get(view, [0.0, 0.0])
                out[key][view] = [max(old[0], frac), max(old[1], largest)]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("view_precision: --device cuda but no CUDA device here", file=sys.stderr)
        return 2
    result = measure(args.images, args.size, args.seeds, args.device)
    line = json.dumps(result)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
