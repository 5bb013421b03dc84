#!/usr/bin/env python
"""Train variants of one recipe (and seeds), one process each; print their final metrics.

    python tools/sweep.py recipes/byol_r18.yaml data.dataset=imagefolder data.root=cifar10 \\
        train.max_steps=582 eval.every_epochs=0 \\
        --variant timm_init --variant torch_init model.init=torch \\
        --variant torch_init_decay_all model.init=torch optim.decay_norm_bias=true \\
        --seeds 0 1 --out runs/sweeps/byol_init

Overrides before the first --variant apply to every variant. Each (variant, seed) trains in
``<out>/<variant>/seed<N>/<timestamp>`` through tools/train.py in a process of its own (a
crash, a non-finite loss or compiled-graph caches stay with that variant), started by
``--launch`` (e.g. "accelerate launch --multi_gpu --num_processes 8"; default: this Python).
Running the same command again reuses finished runs and resumes cut ones, so a sweep longer
than one sitting continues where it stopped. The table (and ``<out>/sweep.json``) lists each
run's results.json.
Bad input (a malformed variant, an override any variant's config rejects) is a one-line error
with exit code 2 before anything trains. The exit code is 1 when a run failed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ssl_ema.config import ConfigError
from ssl_ema.engine.sweep import (  # noqa: F401 (train_command: tests/test_sweep.py)
    finished_run,
    metrics,
    parse_variant,
    plan,
    table,
    train_command,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="YAML recipe")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides for every variant")
    parser.add_argument("--variant", nargs="+", action="append", default=[],
                        metavar=("NAME", "KEY=VALUE"), help="a variant: its name, then overrides "
                        "(repeat for each variant; a name alone trains the recipe as is)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[],
                        help="run.seed values (default: the recipe's)")
    parser.add_argument("--out", type=Path, default=None,
                        help="sweep folder (default: runs/sweeps/<recipe stem>)")
    parser.add_argument("--metrics", nargs="+", default=None,
                        help="results.json keys to tabulate (default: all)")
    parser.add_argument("--launch", default="",
                        help="how to start each run (default: this Python), e.g. "
                        "\"accelerate launch --multi_gpu --num_processes 8\"")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what each run would do (new / resume / reuse) and stop")
    return parser.parse_args(argv)


def run_job(job: Any, launch: str, recipe: str, previous: dict[tuple, dict]) -> dict[str, Any]:
    """Train (or resume, or reuse) one (variant, seed); its row of sweep.json."""
    row: dict[str, Any] = {"variant": job.variant, "seed": job.seed,
                           "overrides": list(job.overrides)}
    if job.action == "reuse":
        old = previous.get((job.variant, job.seed, str(job.run_dir)), {})
        row.update(status="reused", wall_s=old.get("wall_s"), run_dir=str(job.run_dir))
    else:
        cmd = train_command(launch, recipe, job)
        print(f"\n== {job.variant} seed {job.seed}: {shlex.join(cmd)}", flush=True)
        start = time.perf_counter()
        code = subprocess.run(cmd).returncode
        row["wall_s"] = time.perf_counter() - start
        run_dir = finished_run(job.home, job.cfg)
        row["status"] = ("resumed" if job.action == "resume" else "trained") if code == 0 \
            else f"failed ({code})"
        row["run_dir"] = None if run_dir is None else str(run_dir)
    if row.get("run_dir") and row["status"] in ("reused", "trained", "resumed"):
        row["metrics"] = metrics(Path(row["run_dir"]))
    return row


def save(out: Path, args: argparse.Namespace, rows: list[dict], later: list[dict]) -> None:
    """sweep.json, atomically: a cut sweep leaves the last complete table, and the jobs not
    reached yet keep their earlier rows (a cut sweep loses no wall times)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "sweep.json.tmp"
    tmp.write_text(json.dumps({"recipe": args.recipe, "common": args.overrides,
                               "runs": rows + later}, indent=2) + "\n")
    tmp.replace(out / "sweep.json")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or Path("runs") / "sweeps" / Path(args.recipe).stem
    try:
        if not Path(args.recipe).is_file():
            raise ConfigError(f"recipe '{args.recipe}' not found; pass a YAML file "
                              "(e.g. recipes/quickstart.yaml)")
        variants = [parse_variant(tokens) for tokens in args.variant]
        if not variants:
            raise ConfigError("no --variant given; name at least one (e.g. --variant base)")
        jobs = plan(args.recipe, args.overrides, variants, args.seeds, out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for job in jobs:
        where = f" ({job.run_dir})" if job.run_dir else ""
        print(f"{job.variant} seed {job.seed}: {job.action}{where}")
    if args.dry_run:
        return 0

    previous = {}
    if (out / "sweep.json").is_file():
        previous = {(r["variant"], r["seed"], r.get("run_dir")): r
                    for r in json.loads((out / "sweep.json").read_text())["runs"]}
    rows: list[dict[str, Any]] = []
    for job in jobs:
        rows.append(run_job(job, args.launch, args.recipe, previous))
        later = [previous[k] for j in jobs[len(rows):]
                 if (k := (j.variant, j.seed, str(j.run_dir))) in previous]
        save(out, args, rows, later)
    failed = any(not r.get("run_dir") or r["status"].startswith("failed") for r in rows)
    columns = args.metrics or list(dict.fromkeys(k for r in rows for k in r.get("metrics", {})))
    print()
    print(table(rows, columns))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
