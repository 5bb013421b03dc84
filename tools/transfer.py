#!/usr/bin/env python
"""Evaluate frozen backbones on several downstream data sets (kNN and linear probe), each beside
the fair floor: the same architecture with random weights and BatchNorm statistics recomputed
on the downstream training images.

    python tools/transfer.py runs/quickstart/20261123-120000 \\
        --datasets digits fashion_mnist imagefolder=/data/pets [--roles teacher student ema_0.99]
    python tools/transfer.py teacher.safetensors --datasets cifar10=/data/cifar10 cifar100=...

BACKBONE is a run directory / checkpoint (``--roles`` picks any of teacher, student and
ema_<momentum>, compared in one table; default: teacher) or a file written by tools/export.py.
The floor's random weights are drawn with the run's seed (an export: seed 0) by the builder of
the run's config (an export: of its metadata); ``--no-floor`` skips it. Data sets: ``digits``,
``fashion_mnist[=IDX folder]`` (default /usr/share/datasets/fashion-mnist), ``cifar10=ROOT``,
``cifar100=ROOT`` (torchvision or ImageFolder layout), ``imagefolder=ROOT``. Images are brought
to the backbone's channels and image size (``--image-size`` to change it). Prints a table and
writes JSON (``--out``, default ``transfer.json`` beside the run or the file). Bad input is a
one-line error, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl_ema.config import ConfigError

FLOOR = "random, BN recomputed"  # the fair floor's row


class Backbones:
    """The backbones to score (by name), the architecture's random twin, and where to write.
    (A plain class: tests load this script by path, where a dataclass finds no module.)"""

    def __init__(self, models: dict[str, nn.Module], random: nn.Module, in_chans: int,
                 image_size: int, default_out: Path):
        self.models, self.random = models, random
        self.in_chans, self.image_size, self.default_out = in_chans, image_size, default_out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("backbone", help="run directory, checkpoint folder or exported file")
    parser.add_argument("--datasets", nargs="+", default=["digits"], help="name[=root] ...")
    parser.add_argument("--protocols", nargs="+", default=["knn", "linear"])
    parser.add_argument("--roles", "--role", nargs="+", default=None,
                        help="with a run: teacher, student, ema_<momentum> (default: teacher)")
    parser.add_argument("--no-floor", action="store_true", help="skip the fair floor's row")
    parser.add_argument("--image-size", type=int, help="default: the backbone's training size")
    parser.add_argument("--subset", type=int, default=0,
                        help="use at most this many train and test images per data set")
    parser.add_argument("--k", type=int, default=200, help="kNN neighbours")
    parser.add_argument("--temperature", type=float, default=0.1, help="kNN temperature")
    parser.add_argument("--out", type=Path, help="JSON file to write")
    return parser.parse_args(argv)


def load_backbones(path: str, roles: list[str] | None) -> Backbones:
    """A run's backbones by role, or an export's one backbone; each with its random twin."""
    if path.endswith(".safetensors"):
        from ssl_ema.models.backbones import build_backbone
        from ssl_ema.models.export import load_backbone, read_metadata

        if roles is not None:
            raise ConfigError(f"'{path}' is an exported file holding one backbone; --roles "
                              "applies to run directories")
        build = read_metadata(path)["build_kwargs"]
        torch.manual_seed(0)
        random = build_backbone(**build)  # first, so the seed draws its weights
        return Backbones({"export": load_backbone(path)}, random, build["in_chans"],
                         build["image_size"], Path(path).with_suffix(".transfer.json"))
    from ssl_ema.eval.trained import load_run
    from ssl_ema.models.backbones import backbone_from_config

    run = load_run(path)
    roles = roles or ["teacher"]
    models = run.backbones(roles)
    torch.manual_seed(run.cfg.run.seed)
    random = backbone_from_config(run.cfg, run.in_chans)
    out = run.run_dir / "eval" / f"{run.checkpoint.name}-{'-'.join(roles)}-transfer.json"
    return Backbones(models, random, run.in_chans, run.cfg.data.image_size, out)


def table(results: dict[str, dict[str, Any]], protocols: list[str]) -> str:
    """One row per data set and model: accuracy per protocol (and the probe's ECE-15)."""
    ece = "linear" in protocols
    lines = ["  " + f"{'dataset':<16}{'model':<24}{'train':>7}{'test':>7}"
             + "".join(f"{p + ' top-1':>14}" for p in protocols)
             + (f"{'linear ECE-15':>15}" if ece else "")]
    for name, r in results.items():
        for model, m in r["models"].items():
            row = f"  {name:<16}{model:<24}{r['train_images']:>7}{r['test_images']:>7}"
            row += "".join(f"{m[p]['accuracy']:>14.4f}" for p in protocols)
            lines.append(row + (f"{m['linear']['ece_15']:>15.4f}" if ece else ""))
    return "\n".join(lines)


def evaluate(b: Backbones, data: list[Any], args: argparse.Namespace, size: int
             ) -> dict[str, dict[str, Any]]:
    """Every model (and the floor) on every data set."""
    from ssl_ema.eval.transfer import floor_on, prepare, score

    results: dict[str, dict[str, Any]] = {}
    for d in data:
        start = time.perf_counter()
        prepared = prepare(d, in_chans=b.in_chans, image_size=size, subset=args.subset)
        models = dict(b.models)
        if not args.no_floor:
            models[FLOOR] = floor_on(b.random, prepared)
        scores = {name: score(m, prepared, args.protocols, k=args.k,
                              temperature=args.temperature) for name, m in models.items()}
        results[d.name] = {"train_images": len(prepared.train),  # type: ignore[arg-type]
                           "test_images": len(prepared.test),  # type: ignore[arg-type]
                           "seconds": round(time.perf_counter() - start, 1), "models": scores}
        print(f"{d.name}: done in {results[d.name]['seconds']} s", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from ssl_ema.eval.protocols import check_protocol
        from ssl_ema.eval.transfer import load_downstream, parse_spec

        for p in args.protocols:
            check_protocol(p)
        for spec in args.datasets:
            parse_spec(spec)
        b = load_backbones(args.backbone, args.roles)
        data = [load_downstream(spec) for spec in args.datasets]  # missing data: before work
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    b.models = {name: m.to(device) for name, m in b.models.items()}
    b.random = b.random.to(device)
    size = args.image_size or b.image_size
    results = evaluate(b, data, args, size)
    print(f"transfer of {args.backbone} at {size} px:")
    print(table(results, args.protocols))
    out = args.out or b.default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"backbone": args.backbone, "models": list(b.models),
                               "floor": not args.no_floor, "image_size": size,
                               "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
