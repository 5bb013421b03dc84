#!/usr/bin/env python
"""Plot training curves of one or more runs as a PNG.

    python tools/plot.py runs/quickstart/20261123-120000 [RUN ...] [--out curves.png]

Panels against samples seen: loss, learning rate, teacher momentum (base and applied), and the
kNN top-1 of the teacher, the student and each EMA copy (``ema.extra_momenta``). Default output:
``<first run>/curves.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="PNG to write")
    args = parser.parse_args(argv)
    missing = [r for r in args.runs if not (r / "metrics.jsonl").is_file()]
    if missing:
        print(f"error: '{missing[0]}/metrics.jsonl' does not exist; pass run directories "
              "written by tools/train.py", file=sys.stderr)
        return 2
    from ssl_ema.engine.tracking import read_metrics
    from ssl_ema.eval.curves import plot_training_curves

    # a run is named by its recipe (run dirs are <output>/<run.name>/<timestamp>) when that is
    # unique among the runs given, else by its path
    recipes = [r.resolve().parent.name for r in args.runs]
    names = [n if recipes.count(n) == 1 else str(r) for n, r in zip(recipes, args.runs)]
    runs = {n: read_metrics(r / "metrics.jsonl") for n, r in zip(names, args.runs)}
    out = args.out or args.runs[0] / "curves.png"
    plot_training_curves(runs, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
