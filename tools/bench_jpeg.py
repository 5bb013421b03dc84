"""Training images/s on an ImageNet-like JPEG folder: the jpeg pipeline, a PIL loader, the bound.

Generates (once, reused while its parameters match) a folder of ``--images`` random-content JPEGs
of about ``--size`` pixels under ``--dir``, then, on whatever device is there, with the recipe's
model (default: recipes/byol_r50_imagenet.yaml, ResNet-50 BYOL at 224 px) at ``--batch``:
1. ``jpeg_pipeline``: the real training loop (`Trainer.fit`, ``data.pipeline=jpeg``: bytes read
   by ``--workers`` loader workers, decoded and augmented on the device) over its last
   ``--steps`` steps; ``jpeg_views_alone``: the same stream's batches without training;
2. ``loader_and_step``: lightly's BYOL transforms on PIL in ``--workers`` DataLoader workers
   feeding the same step (``loader_alone``: the loader without training);
3. ``compute_bound``: the same step on one batch of views already on the device.
``decoder`` says which decoder ran and how many files it refused (decoded on the CPU instead).
Prints one JSON line (and writes ``--out``). On a CPU, with tiny sizes, it checks the whole path
before GPU time is spent:

    python tools/bench_jpeg.py --dir /tmp/jpegs --images 64 --classes 4 --size 64x48 \\
        --batch 8 --warmup 1 --steps 2 --workers 2 \\
        model.backbone=test_resnet data.image_size=32
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
from collections.abc import Iterator, Sequence
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_train import lightly_loader, ours, record, step_fn, timed  # tools/, a sibling

from ssl_ema.config import Config, ConfigError, load_config
from ssl_ema.engine.trainer import Trainer

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "byol_r50_imagenet.yaml")


def jpeg(seed: int, height: int, width: int) -> bytes:
    """Random content with some structure: a coarse colour field upscaled, plus noise (pure noise
    would compress far worse than photographs and make decoding look slower than it is)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    field = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(field).resize((width, height), Image.BICUBIC), np.int16)
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write(job: tuple[str, int, int, int]) -> int:
    path, seed, height, width = job
    data = jpeg(seed, height, width)
    Path(path).write_bytes(data)
    return len(data)


def make_folder(root: Path, images: int, classes: int, size: tuple[int, int],
                test_images: int) -> dict[str, float]:
    """root/{train,test}/cNNNN/*.jpg, sizes within +-25% of ``size`` (h, w); kept if the same
    request was made before (root/params.json)."""
    params = {"images": images, "classes": classes, "size": list(size), "test": test_images}
    marker = root / "params.json"
    if marker.is_file() and json.loads(marker.read_text())["request"] == params:
        return json.loads(marker.read_text())["made"]
    rng = np.random.default_rng(0)
    jobs = []
    for split, n in (("train", images), ("test", test_images)):
        for i in range(n):
            folder = root / split / f"c{i % classes:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            h, w = (int(s * rng.uniform(0.75, 1.25)) for s in size)
            jobs.append((str(folder / f"{split}{i:07d}.jpg"), len(jobs), h, w))
    with Pool() as pool:
        sizes = pool.map(_write, jobs, chunksize=64)
    made = {"files": len(jobs), "mean_kib": sum(sizes) / len(sizes) / 1024}
    marker.write_text(json.dumps({"request": params, "made": made}))
    return made


def bench_config(args: argparse.Namespace) -> Config:
    return load_config(args.recipe, [
        f"data.root={args.dir}", f"data.index_cache={args.dir / 'index_cache'}",
        f"data.num_workers={args.workers}", f"train.batch_size={args.batch}",
        "eval.every_epochs=0", "data.eval_subset=64", "train.checkpoint_every=0",
        "train.checkpoint_every_minutes=0", f"train.max_steps={args.warmup + args.steps}",
        f"train.log_every={math.gcd(args.warmup, args.steps)}", *args.overrides])


def endless(stream: Any) -> Iterator[Any]:
    epoch = 1
    while True:
        stream.set_epoch(epoch)
        yield from stream
        epoch += 1


def measure(cfg: Config, args: argparse.Namespace, result: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, Path(tmp) / "run")
        device = tr.accelerator.device
        result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        record(result, "jpeg_pipeline", ours(tr, args.warmup, args.steps))
        stream = tr.train_loader(0)
        batches = endless(stream)
        record(result, "jpeg_views_alone",
               timed(device, args.steps, lambda: next(batches), args.batch))
        fixed = next(batches)
        # Which decoder ran: a file nvJPEG refuses is decoded on the CPU and counted, and
        # numbers measured that way are not the GPU decoder's.
        result["decoder"] = {"name": f"torchvision decode_jpeg on {device.type} ("
                             f"{'nvJPEG' if device.type == 'cuda' else 'libjpeg-turbo'})",
                             "decode_fallbacks": stream.decode_fallbacks}
        step = step_fn(tr)
        record(result, "compute_bound", timed(device, args.steps, lambda: step(fixed),
                                              args.batch))
        if not args.skip_loader:
            result.update(lightly_loader(cfg, tr, args.steps, args.workers))
    result["jpeg_vs_compute_bound"] = result["jpeg_pipeline"] / result["compute_bound"]
    if "loader_and_step" in result:
        result["jpeg_vs_loader"] = result["jpeg_pipeline"] / result["loader_and_step"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the recipe")
    p.add_argument("--dir", type=Path, required=True, help="where the JPEG folder is made")
    p.add_argument("--recipe", default=RECIPE, help="default: recipes/byol_r50_imagenet.yaml")
    p.add_argument("--images", type=int, default=20_000, help="training JPEGs")
    p.add_argument("--test-images", type=int, default=500)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--size", default="350x400", help="HxW of the JPEGs (+-25%% each)")
    p.add_argument("--batch", type=int, default=256, help="training batch (one device)")
    p.add_argument("--warmup", type=int, default=20, help="steps before timing")
    p.add_argument("--steps", type=int, default=50, help="timed steps")
    p.add_argument("--workers", type=int, default=16, help="loader workers (both loaders)")
    p.add_argument("--skip-loader", action="store_true", help="skip the PIL/lightly loader")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    return p


def checked(args: argparse.Namespace) -> tuple[Config, int, int]:
    """The bench's config and the JPEGs' (height, width); ConfigError naming a bad argument."""
    try:
        h, w = (int(s) for s in args.size.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size {args.size!r}: expected HxW, e.g. 350x400") from None
    if min(args.warmup, args.steps, args.images, args.classes, h, w) < 1:
        raise ConfigError("--size, --images, --classes, --warmup and --steps must be positive")
    if args.images < args.batch:
        raise ConfigError(f"--images {args.images} is less than --batch {args.batch}")
    return bench_config(args), h, w


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg, h, w = checked(args)
    except ConfigError as e:
        print(f"bench_jpeg: {e}", file=sys.stderr)
        return 2
    result: dict[str, Any] = {"recipe": args.recipe, "overrides": args.overrides,
                              "batch": args.batch, "workers": args.workers,
                              "folder": make_folder(args.dir, args.images, args.classes, (h, w),
                                                    args.test_images)}
    measure(cfg, args, result)
    line = json.dumps(result)
    print(line)
    if args.out:
        args.out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
