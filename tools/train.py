#!/usr/bin/env python
"""Train a teacher-student method from a recipe.

    python tools/train.py recipes/quickstart.yaml [key.sub=value ...]
    python tools/train.py --resume runs/quickstart/20261122-120000
    python tools/train.py recipes/quickstart.yaml --stop-after 600   # checkpoint, exit 3
    accelerate launch --multi_gpu --num_processes 8 tools/train.py RECIPE   # several processes

Bad input (unknown key, wrong type, unknown method/backbone/dataset, missing data) is a one-line
error with exit code 2, before any model is built and without touching existing runs.
SIGTERM, SIGINT or SIGUSR1 write a checkpoint of the last completed step (one process: the step
or evaluation in flight is abandoned) and exit with 128 + the signal's number; ``--resume``
continues from there (docs/GUARANTEES.md). One process needs no launcher, and under one
(``accelerate launch``) exit codes become 1 (docs/CONFIGURATION.md, "Training commands").
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # --stop-after counts from here: start-up is part of the budget

import argparse  # noqa: E402
import sys  # noqa: E402

from ssl_ema.config import ConfigError, load_config  # noqa: E402  (imports no torch)
from ssl_ema.engine.stop import exit_now  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", help="YAML recipe (optional with --resume)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--resume", metavar="RUN_DIR_OR_CHECKPOINT",
                        help="continue a run from its newest intact (or the given) checkpoint")
    parser.add_argument("--stop-after", type=float, default=None, metavar="SECONDS",
                        help="checkpoint and stop (exit code 3) once SECONDS have passed; "
                        "--resume continues the run")
    args = parser.parse_args(argv)
    if args.stop_after is not None and args.stop_after <= 0:
        parser.error("--stop-after: give a positive number of seconds")
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe and "=" in recipe and not recipe.endswith((".yaml", ".yml")):
        recipe, overrides = None, [recipe, *overrides]  # only overrides after --resume
    stop_at = None if args.stop_after is None else STARTED + args.stop_after
    if recipe is not None and args.resume is None:
        try:  # a recipe's typo is one line before torch and the engine are imported (seconds)
            load_config(recipe, overrides)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    from ssl_ema.engine.launch import train

    return train(recipe, overrides, args.resume, stop_at)


if __name__ == "__main__":
    code = main()
    if code > 128:  # stopped by a signal: within the launcher's grace (engine/stop.py)
        exit_now(code)
    sys.exit(code)
