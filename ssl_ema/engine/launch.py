"""What ``tools/train.py`` and ``tools/finetune.py`` run: validate, build, fit, print.

Exit codes: 0 done; 2 bad input (a one-line error before any model is built and without touching
existing runs); 1 a non-finite loss stopped training (``train.nonfinite=fail``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ssl_ema.config import ConfigError
from ssl_ema.engine.guard import NonFiniteLoss
from ssl_ema.engine.run import prepare_run


def train(recipe: str | None, overrides: Sequence[str], resume: str | None = None) -> int:
    """Train a recipe (or resume a run), print the evaluation table; the exit code."""
    try:
        if recipe is None and resume is None:
            raise ConfigError("no recipe given; pass a YAML recipe (e.g. recipes/quickstart.yaml) "
                              "or --resume RUN_DIR")
        cfg, run_dir, checkpoint = prepare_run(recipe, overrides, resume)
        from ssl_ema.engine.trainer import Trainer  # heavy imports only once the input is valid

        trainer = Trainer(cfg, run_dir, checkpoint)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = trainer.fit()
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        # Destroys the process group: a gloo/NCCL group left to interpreter exit can abort a
        # rank ("terminate called without an active exception") after training succeeded.
        trainer.accelerator.end_training()
    if trainer.accelerator.is_main_process:
        print(trainer.evaluation.table(result))
    return 0
