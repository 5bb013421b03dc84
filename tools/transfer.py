#!/usr/bin/env python
"""Evaluate one frozen backbone on several downstream data sets (kNN and linear probe).

    python tools/transfer.py runs/quickstart/20261123-120000 \\
        --datasets digits fashion_mnist imagefolder=/data/pets [--role teacher]
    python tools/transfer.py teacher.safetensors --datasets cifar10=/data/cifar10 cifar100=...

BACKBONE is a run directory / checkpoint (``--role`` picks teacher, student or ema_<momentum>)
or a file written by tools/export.py. Data sets: ``digits``, ``fashion_mnist[=IDX folder]``
(default /usr/share/datasets/fashion-mnist), ``cifar10=ROOT``, ``cifar100=ROOT`` (torchvision
or ImageFolder layout), ``imagefolder=ROOT``. Images are brought to the backbone's channels and
image size (``--image-size`` to change it). Prints a table and writes JSON (``--out``, default
``transfer.json`` beside the run or the file). Bad input is a one-line error, exit code 2.
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("backbone", help="run directory, checkpoint folder or exported file")
    parser.add_argument("--datasets", nargs="+", default=["digits"], help="name[=root] ...")
    parser.add_argument("--protocols", nargs="+", default=["knn", "linear"])
    parser.add_argument("--role", default="teacher", help="with a run: which backbone")
    parser.add_argument("--image-size", type=int, help="default: the backbone's training size")
    parser.add_argument("--subset", type=int, default=0,
                        help="use at most this many train and test images per data set")
    parser.add_argument("--k", type=int, default=200, help="kNN neighbours")
    parser.add_argument("--temperature", type=float, default=0.1, help="kNN temperature")
    parser.add_argument("--out", type=Path, help="JSON file to write")
    return parser.parse_args(argv)


def load_backbone_arg(path: str, role: str) -> tuple[nn.Module, int, int, Path]:
    """(backbone, in_chans, training image size, default JSON path) of a run or an export."""
    if path.endswith(".safetensors"):
        from ssl_ema.models.export import load_backbone, read_metadata

        build = read_metadata(path)["build_kwargs"]
        return load_backbone(path), build["in_chans"], build["image_size"], \
            Path(path).with_suffix(".transfer.json")
    from ssl_ema.eval.trained import load_run

    run = load_run(path)
    backbone = run.backbones([role])[role]
    out = run.run_dir / "eval" / f"{run.checkpoint.name}-{role}-transfer.json"
    return backbone, run.in_chans, run.cfg.data.image_size, out


def table(results: dict[str, dict[str, Any]], protocols: list[str]) -> str:
    lines = ["  " + f"{'dataset':<16}{'train':>8}{'test':>8}"
             + "".join(f"{p + ' top-1':>14}" for p in protocols)
             + (f"{'linear ECE-15':>15}" if "linear" in protocols else "")]
    for name, r in results.items():
        row = f"  {name:<16}{r['train_images']:>8}{r['test_images']:>8}"
        row += "".join(f"{r[p]['accuracy']:>14.4f}" for p in protocols)
        if "linear" in protocols:
            row += f"{r['linear']['ece_15']:>15.4f}"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from ssl_ema.eval.protocols import check_protocol
        from ssl_ema.eval.transfer import load_downstream, parse_spec, transfer_evaluate

        for p in args.protocols:
            check_protocol(p)
        for spec in args.datasets:
            parse_spec(spec)
        backbone, in_chans, size, default_out = load_backbone_arg(args.backbone, args.role)
        data = [load_downstream(spec) for spec in args.datasets]  # missing data: before work
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    backbone = backbone.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    size = args.image_size or size
    results = {}
    for d in data:
        start = time.perf_counter()
        results[d.name] = transfer_evaluate(backbone, d, args.protocols, in_chans=in_chans,
                                            image_size=size, subset=args.subset, k=args.k,
                                            temperature=args.temperature)
        results[d.name]["seconds"] = round(time.perf_counter() - start, 1)
        print(f"{d.name}: done in {results[d.name]['seconds']} s", flush=True)
    print(f"transfer of {args.backbone} ({args.role}) at {size} px:")
    print(table(results, args.protocols))
    out = args.out or default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"backbone": args.backbone, "role": args.role, "image_size": size,
                               "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
