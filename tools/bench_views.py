#!/usr/bin/env python
"""Views per second of the classification methods' device pipeline (``data.pipeline=device``).

    python tools/bench_views.py [--device cuda] [--images 50000] [--batches 20]

Times the training streams of `ssl_ema.data.device_classify` alone (no model) on uint8 images
of CIFAR-10's shape held on the device: ``supervised`` (one weak view per image, batch 128 as
recipes/supervised_ema_r18.yaml) and ``pseudo_label`` (per item one weak labelled view, μ weak
and μ strong unlabelled views; batch 64, μ = 7, RandAugment(2, 10) as
recipes/pseudo_label_r18.yaml). Random pixels: every op's cost is independent of the content.
Prints and (``--json``) writes views/s and images/s (the method's images per second: labelled
plus unlabelled), median over ``--repeats`` timings of ``--batches`` batches each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ssl_ema.data.device_classify import (
    ClassifySpec,
    ClassifyStream,
    SemiSupervisedStream,
    SupervisedStream,
)

MEAN, STD = (0.491, 0.482, 0.447), (0.247, 0.243, 0.262)


def streams(x: torch.Tensor, mu: int) -> dict[str, tuple[ClassifyStream, int, int]]:
    """name -> (stream, views per batch, images per batch)."""
    n, device = len(x), x.device
    weak, strong = ClassifySpec(32), ClassifySpec(32, num_ops=2, magnitude=10)
    labels = torch.zeros(n, dtype=torch.int64, device=device)
    labelled = torch.arange(0, 4000, device=device)
    unlabelled = torch.arange(4000, n, device=device)
    return {"supervised": (SupervisedStream(x, labels, weak, MEAN, STD, 128, seed=0), 128, 128),
            "pseudo_label": (SemiSupervisedStream(x, labels, labels, labelled, unlabelled, mu,
                                                  weak, strong, MEAN, STD, 64, seed=0),
                             64 * (1 + 2 * mu), 64 * (1 + mu))}


def time_stream(stream: ClassifyStream, batches: int, repeats: int, device: torch.device
                ) -> float:
    """Median seconds for ``batches`` batches (after one untimed batch)."""
    stream.set_epoch(0)
    it = stream.iter_from(0)
    next(it)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(batches):
            out = next(it)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        del out
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--batches", type=int, default=20, help="batches per timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mu", type=int, default=7)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_views.py: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    needed = 4000 + (args.batches * args.repeats + 1) * 64 * args.mu
    if args.images < needed or min(args.batches, args.repeats, args.mu) < 1:
        print(f"bench_views.py: need --images >= {needed} (4,000 labelled + the unlabelled "
              "images the timed batches use) and positive counts", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=g)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(device)
                              if device.type == "cuda" else "cpu",
                              "threads": torch.get_num_threads(), "images": args.images}
    for name, (stream, views, images) in streams(x.to(device), args.mu).items():
        seconds = time_stream(stream, args.batches, args.repeats, device)
        result[name] = {"views_per_s": views * args.batches / seconds,
                        "images_per_s": images * args.batches / seconds}
        print(f"{name}: {result[name]['views_per_s']:,.0f} views/s, "
              f"{result[name]['images_per_s']:,.0f} images/s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
