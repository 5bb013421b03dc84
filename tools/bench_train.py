"""Training images/s of a recipe, against a lightly-style loader and against the compute bound.

Four numbers from one run, on whatever device is there (the recipe's model, batch and precision):
1. ``ours``: the real training loop (`Trainer.fit`, ``data.pipeline=device``) for ``--warmup`` +
   ``--steps`` optimizer steps; images/s over the last ``--steps`` (compilation excluded).
2. ``phases``: the same step cut into augment / forward / backward / optimizer / EMA, with a
   device synchronisation after each phase (so their sum exceeds the pipelined step).
3. ``compute_bound``: the same step on one batch of views already on the device (no augmentation,
   no loader), as ../shared/GPU.md measures it.
4. ``lightly_loader``: lightly's BYOL transforms in ``--workers`` DataLoader workers (lightly's
   CIFAR-10 benchmark set-up), alone and feeding the same step: the CPU-augmentation pipeline.
Peak GPU memory is reported for the training loop. Prints a table and writes ``--out`` (JSON).

    python tools/bench_train.py recipes/byol_r18.yaml data.dataset=imagefolder \\
        data.root=/path/to/cifar10 --steps 100 --out bench.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ssl_ema.config import Config, ConfigError, load_config
from ssl_ema.data.datasets import Transformed
from ssl_ema.data.device import DeviceTrainStream
from ssl_ema.data.views import byol_rgb_views
from ssl_ema.engine.loaders import build_run_data
from ssl_ema.engine.tracking import read_metrics
from ssl_ema.engine.trainer import Trainer


def record(result: dict[str, Any], key: str, value: Any) -> None:
    """Store and print at once: a later phase that fails does not lose the earlier numbers."""
    result[key] = value
    print(f"{key}: {value}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_fn(tr: Trainer) -> Callable[[tuple[torch.Tensor, ...]], None]:
    """One optimizer step of the trainer's model, optimizer and EMA on a given batch."""
    acc, momentum = tr.accelerator, tr.model.momentum(0.5)

    def step(batch: tuple[torch.Tensor, ...]) -> None:
        out = tr.forward(batch)
        acc.backward(out["loss"])
        tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)
        tr.ema.update([momentum] * (1 + len(tr.cfg.ema.extra_momenta)))

    return step


def ours(tr: Trainer, warmup: int, steps: int) -> float:
    """images/s of `Trainer.fit` over its last ``steps`` steps (from its own metrics log)."""
    tr.fit()
    rows = [r for r in read_metrics(tr.run_dir / "metrics.jsonl") if r["event"] == "train"]
    images = seconds = 0.0
    for before, row in zip(rows, rows[1:]):  # each row's rate covers the steps since the last
        if before["step"] >= warmup:
            n = row["samples_seen"] - before["samples_seen"]
            images, seconds = images + n, seconds + n / row["images_per_s"]
    return images / seconds


def phases(tr: Trainer, stream: DeviceTrainStream, steps: int) -> dict[str, float]:
    """Milliseconds per phase, synchronising after each."""
    acc, device, momentum = tr.accelerator, tr.accelerator.device, tr.model.momentum(0.5)
    k = 1 + len(tr.cfg.ema.extra_momenta)
    names = ("augment", "forward", "backward", "optimizer", "ema")
    total = dict.fromkeys(names, 0.0)
    batches = stream.iter_from(0)
    t: list[float] = []

    def mark() -> None:
        sync(device)
        t.append(time.perf_counter())

    for i in range(steps + 3):
        t.clear()
        t.append(time.perf_counter())
        batch = next(batches)
        mark()
        out = tr.forward(batch)
        mark()
        acc.backward(out["loss"])
        mark()
        tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)
        mark()
        tr.ema.update([momentum] * k)
        mark()
        if i >= 3:  # warm-up
            for name, a, b in zip(names, t, t[1:]):
                total[name] += (b - a) * 1000 / steps
    return total


def host_syncs_per_step(tr: Trainer, stream: DeviceTrainStream, steps: int = 5) -> float:
    """Host syncs the trainer's step makes (CUDA's sync debug mode counts them; CUDA only)."""
    # After `fit` (which ends at a log point): up to ``steps`` more steps of the loop, stopping
    # before the next log point and before ``total_steps`` (whose log lines sync by design).
    log_every = tr.cfg.train.log_every
    steps = min(steps, log_every - 1) if log_every > 1 else steps
    tr.total_steps = tr.state.step + steps + 1
    batches = itertools.islice(stream.iter_from(0), steps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            tr.train_on(batches, tr.hyper(0), len(stream))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught
             if "synchroniz" in str(w.message) and "prototype" not in str(w.message)]
    for w in syncs[:3]:
        print(f"host sync: {w.filename}:{w.lineno}: {w.message}", file=sys.stderr)
    return len(syncs) / steps


def timed(device: torch.device, steps: int, one: Callable[[], None], images: int) -> float:
    one()
    one()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    sync(device)
    return images * steps / (time.perf_counter() - t0)


def lightly_loader(cfg: Config, tr: Trainer, steps: int, workers: int) -> dict[str, float]:
    """lightly's BYOL transforms in DataLoader workers: alone, and feeding the same step."""
    d = cfg.data
    loader_cfg = load_config(None, [f"data.dataset={d.dataset}", f"data.root={d.root}",
                                    "data.corrupt=trust"])
    source = build_run_data(loader_cfg).train.source
    data = Transformed(source, byol_rgb_views(cfg.data.image_size, (0.5,) * 3, (0.5,) * 3))
    batch = tr.per_device[cfg.train.batch_size]
    loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True,
                        num_workers=workers, pin_memory=True, persistent_workers=True,
                        prefetch_factor=4)
    device, step = tr.accelerator.device, step_fn(tr)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format

    def endless() -> Iterator[Any]:
        while True:
            yield from loader

    batches = endless()
    alone = timed(device, steps, lambda: next(batches), batch)

    def fed() -> None:
        v0, v1, y = next(batches)
        views = (v.to(device, non_blocking=True).contiguous(memory_format=memory_format)
                 for v in (v0, v1))
        step((*views, y.to(device, non_blocking=True)))

    return {"loader_alone": alone, "loader_and_step": timed(device, steps, fed, batch)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe", help="recipe YAML (e.g. recipes/byol_r18.yaml)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--warmup", type=int, default=30, help="steps before timing (compilation)")
    p.add_argument("--steps", type=int, default=100, help="timed steps")
    p.add_argument("--workers", type=int, default=16, help="loader workers for lightly's path")
    p.add_argument("--skip-lightly", action="store_true", help="skip the lightly-style loader")
    p.add_argument("--out", "--json", type=Path, help="write the results here (JSON)")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def bench_config(args: argparse.Namespace) -> Config:
    """The recipe as the bench trains it (ConfigError if it is rejected)."""
    return load_config(args.recipe, [
        *args.overrides, "data.pipeline=device", "eval.every_epochs=0",
        "data.eval_subset=1024", "train.checkpoint_every=0", "train.checkpoint_every_minutes=0",
        f"train.max_steps={args.warmup + args.steps}",
        f"train.log_every={math.gcd(args.warmup, args.steps)}"])


def resolve(argv: Sequence[str]) -> dict[str, Any]:
    """What the result depends on (tools/reproduce.py keys its record on it): the resolved
    training config (where the data lives aside) and the bench's own counts."""
    from ssl_ema.config import to_dict
    from ssl_ema.engine.run import flatten

    args = parse_args(argv)
    config = {k: v for k, v in flatten(to_dict(bench_config(args))).items()
              if k not in ("data.root", "run.output_dir", "run.name")}
    return {"config": config, "warmup": args.warmup, "steps": args.steps,
            "workers": args.workers, "skip_lightly": args.skip_lightly}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        print("bench_train: --warmup and --steps must be positive", file=sys.stderr)
        return 2
    try:
        cfg = bench_config(args)
    except ConfigError as e:
        print(f"bench_train: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, Path(tmp) / "run")
        device = tr.accelerator.device
        batch = cfg.train.batch_size
        result: dict[str, Any] = {"device": torch.cuda.get_device_name(device)
                                  if device.type == "cuda" else "cpu",
                                  "batch": batch, "recipe": args.recipe,
                                  "overrides": args.overrides}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        record(result, "ours", ours(tr, args.warmup, args.steps))
        if device.type == "cuda":
            record(result, "peak_memory_gib", torch.cuda.max_memory_allocated(device) / 2**30)
        stream = tr.train_loader(0)
        assert isinstance(stream, DeviceTrainStream)
        stream.set_epoch(1)
        record(result, "phases_ms", phases(tr, stream, min(args.steps, 30)))
        fixed = next(stream.iter_from(0))
        step = step_fn(tr)
        record(result, "compute_bound", timed(device, args.steps, lambda: step(fixed), batch))
        if device.type == "cuda":
            record(result, "host_syncs_per_step", host_syncs_per_step(tr, stream))
        record(result, "augment_alone",
               timed(device, args.steps, lambda: next(stream.iter_from(0)), batch))
        if not args.skip_lightly:
            result.update(lightly_loader(cfg, tr, min(args.steps, 50), args.workers))
    result["ours_vs_compute_bound"] = result["ours"] / result["compute_bound"]
    if "loader_and_step" in result:
        result["ours_vs_lightly_loader"] = result["ours"] / result["loader_and_step"]
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
