#!/usr/bin/env python
"""Plot training curves of one or more runs, or a study's EMA Scaling Rule figure, as a PNG.

    python tools/plot.py runs/quickstart/20261123-120000 [RUN ...] [--out curves.png]
    python tools/plot.py --study scaling-cpu [--out scaling.png]

Runs: panels against samples seen: loss, learning rate, teacher momentum (base and applied), and
the accuracy (kNN, or test top-1 for classification runs) of the teacher (solid), the student
(dashed) and each EMA copy (dotted, a marker per momentum); one colour per run in every panel;
the fair floor (random weights, BatchNorm recomputed) as a horizontal line. Default output:
``<first run>/curves.png``.

Study (a name in docs/results/ or a path to its JSON, written by tools/reproduce.py): the
teacher's and the student's accuracy against samples seen for each κ, with the rule (solid) and
without (dashed), seed means with each seed faint. Default output: ``<study>-scaling.png``
beside the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def study_path(spec: str) -> Path:
    """A study's JSON from its name (docs/results/<name>.json) or its path."""
    path = Path(spec)
    return path if path.suffix == ".json" else ROOT / "docs" / "results" / f"{spec}.json"


def plot_study(spec: str, out: Path | None) -> int:
    import matplotlib.pyplot as plt

    from ssl_ema.reproduce.scaling_figure import draw_scaling_figure

    path = study_path(spec)
    if not path.is_file():
        print(f"error: study file '{path}' does not exist; name a study in docs/results/ or "
              "pass the path of one tools/reproduce.py wrote", file=sys.stderr)
        return 2
    try:
        fig = draw_scaling_figure(json.loads(path.read_text()))
    except (ValueError, KeyError) as e:
        print(f"error: {path}: {e}", file=sys.stderr)
        return 2
    out = out or path.with_name(f"{path.stem}-scaling.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    return 0


def plot_runs(run_dirs: list[Path], out: Path | None) -> int:
    missing = [r for r in run_dirs if not (r / "metrics.jsonl").is_file()]
    if missing:
        print(f"error: '{missing[0]}/metrics.jsonl' does not exist; pass run directories "
              "written by tools/train.py", file=sys.stderr)
        return 2
    from ssl_ema.engine.tracking import read_metrics
    from ssl_ema.eval.curves import plot_training_curves

    # a run is named by its recipe (run dirs are <output>/<run.name>/<timestamp>) when that is
    # unique among the runs given, else by its path
    recipes = [r.resolve().parent.name for r in run_dirs]
    names = [n if recipes.count(n) == 1 else str(r) for n, r in zip(recipes, run_dirs)]
    runs = {n: read_metrics(r / "metrics.jsonl") for n, r in zip(names, run_dirs)}
    out = out or run_dirs[0] / "curves.png"
    plot_training_curves(runs, out)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="run directories (with metrics.jsonl)")
    parser.add_argument("--study", help="a reproduction study: name or docs/results/<name>.json")
    parser.add_argument("--out", type=Path, help="PNG to write")
    args = parser.parse_args(argv)
    if bool(args.runs) == bool(args.study):
        print("error: pass run directories or --study NAME, not both and not neither",
              file=sys.stderr)
        return 2
    return plot_study(args.study, args.out) if args.study else plot_runs(args.runs, args.out)


if __name__ == "__main__":
    sys.exit(main())
