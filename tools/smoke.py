#!/usr/bin/env python
"""The smoke check: every CUDA path a few steps each, one JSON line per check as it ends.

    python tools/smoke.py [--out smoke.jsonl] [--budget 170] [--check NAME ...] [--tiny]

Run first in every GPU lease (tools/lease.sh): on synthetic data it makes itself, each check
(`ssl_ema/reproduce/smoke.py`: byol_lightly, fused_ema, dino_multicrop, moco, supervised,
pseudo_label, jpeg, views) trains a few steps through the real trainer, and its line (ok, the
error in one line, seconds, what it measured) is printed and appended to ``--out`` (flushed and
fsynced) as it ends, so a killed command still returns the finished checks. Checks past
``--budget`` seconds are listed as skipped. On a GPU, ``byol_lightly``'s images/s is stored as
the device's speed in ``--results``/devices.json (the ratio every estimate carries by). On a CPU
the checks run at tiny sizes (``--tiny`` forces them anywhere). Exit code: 0 if every check ran
and passed, 1 otherwise, 2 for bad input.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from ssl_ema.reproduce.smoke import CHECKS, CPU, GPU, Smoke

ROOT = Path(__file__).resolve().parents[1]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--out", type=Path, help="append each check's JSON line here")
    p.add_argument("--budget", type=float, default=170.0, help="seconds; later checks skipped")
    p.add_argument("--check", action="append", choices=sorted(CHECKS), help="only these")
    p.add_argument("--tiny", action="store_true", help="CPU sizes on any device")
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "results",
                   help="where the device's measured speed is stored (devices.json)")
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = p.parse_args(argv)
    if args.out is not None and args.out.is_dir():
        print(f"smoke: --out {args.out} is a folder; give a file", file=sys.stderr)
        return 2
    sizes = CPU if args.tiny or not torch.cuda.is_available() else GPU
    checks = [c for c in CHECKS if not args.check or c in args.check]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        try:  # the synthetic data set, before any check
            smoke = Smoke(work, args.out, args.results, sizes)
        except OSError as e:
            print(f"smoke: cannot write the synthetic data under {work}: {e.strerror or e}; "
                  "pass a writable --work", file=sys.stderr)
            return 2
        lines = smoke.run(checks, args.budget)
    return 0 if all(line["ok"] for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
