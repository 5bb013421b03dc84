"""What ``tools/train.py`` and ``tools/finetune.py`` run: validate, build, fit, print.

Exit codes: 0 done; 2 bad input (a one-line error before any model is built and without touching
existing runs); 1 a non-finite loss stopped training (``train.nonfinite=fail``); 3 the
``--stop-after`` deadline stopped training after a checkpoint (resume to continue).
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Sequence

from ssl_ema.config import ConfigError
from ssl_ema.engine.deadline import DeadlineReached
from ssl_ema.engine.guard import NonFiniteLoss
from ssl_ema.engine.run import prepare_run


def train(recipe: str | None, overrides: Sequence[str], resume: str | None = None,
          stop_at: float | None = None) -> int:
    """Train a recipe (or resume a run), print the evaluation table; the exit code.
    ``stop_at``: checkpoint and stop (exit code 3) once ``time.monotonic()`` passes it."""
    try:
        if recipe is None and resume is None:
            raise ConfigError("no recipe given; pass a YAML recipe (e.g. recipes/quickstart.yaml) "
                              "or --resume RUN_DIR")
        cfg, run_dir, checkpoint = prepare_run(recipe, overrides, resume)
        from ssl_ema.engine.trainer import Trainer  # heavy imports only once the input is valid

        trainer = Trainer(cfg, run_dir, checkpoint, stop_at)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = trainer.fit()
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except DeadlineReached as e:
        print(f"{e}; resume with: tools/train.py --resume {trainer.run_dir}", file=sys.stderr)
        code = 3
    else:
        if trainer.accelerator.is_main_process:
            print(trainer.evaluation.table(result))
        code = 0
    # Free the process group while the interpreter is alive. destroy_process_group (in
    # end_training) alone is not enough: the DDP wrapper keeps the group, and gloo frees each
    # finished collective, with the tensors Python handed it, in a worker thread that needs the
    # GIL; a late thread meeting interpreter finalisation aborts the rank ("terminate called
    # without an active exception": CI on a loaded 2-core machine, the core dump showing
    # ~AsyncAllgatherWork in ProcessGroupGloo::runLoop; pytorch/pytorch#179291 is the same
    # race). Dropping the trainer and collecting runs the group's destructor now, which drains
    # and joins those threads.
    trainer.accelerator.end_training()
    del trainer
    gc.collect()
    return code
