"""What ``tools/train.py`` and ``tools/finetune.py`` run: validate, build, fit, print.

Exit codes: 0 done (or a finished run resumed: nothing to do); 2 bad input (a one-line error
before any model is built and without touching existing runs; or an unreadable image that
``data.pipeline=jpeg`` meets while training, after the last checkpoint); 1 a non-finite loss stopped
training (``train.nonfinite=fail``) or a checkpoint or log could not be written (disk full,
permissions: one line naming the path); 3 the ``--stop-after`` deadline stopped training after
writing a checkpoint; 128 + N a stop signal N (SIGINT 130, SIGUSR1 138, SIGTERM 143) stopped
training after writing a checkpoint (``engine/stop.py``). After 3 or 128 + N, ``--resume``
continues.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate import PartialState

from ssl_ema.config import ConfigError
from ssl_ema.engine.checkpoint import CheckpointWriteError
from ssl_ema.engine.guard import NonFiniteLoss
from ssl_ema.engine.lock import RunLock, lock_run_dir
from ssl_ema.engine.run import check_engine, check_launch, cpu_processes, prepare_run
from ssl_ema.engine.stop import Stopped, stop_with_launcher
from ssl_ema.posthoc import SnapshotWriteError

if TYPE_CHECKING:
    from ssl_ema.engine.trainer import Trainer


def train(recipe: str | None, overrides: Sequence[str], resume: str | None = None,
          stop_at: float | None = None) -> int:
    """Train a recipe (or resume a run), print the evaluation table; the exit code.
    ``stop_at``: checkpoint and stop (exit code 3) once ``time.monotonic()`` passes it."""
    try:
        trainer, lock = _start(recipe, overrides, resume, stop_at)
    except ConfigError as e:
        # Every rank runs the same start-up checks: one of them says so, or their lines
        # interleave on the launcher's shared stderr.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before training started; nothing was written", file=sys.stderr)
        return 130
    try:
        code, message = _fit(trainer)
    finally:
        lock.release()
    if message and trainer.accelerator.is_main_process:
        print(message, file=sys.stdout if code == 0 else sys.stderr)
    # Free the process group while the interpreter is alive. destroy_process_group (in
    # end_training) alone is not enough: the DDP wrapper keeps the group, and gloo frees each
    # finished collective, with the tensors Python handed it, in a worker thread that needs the
    # GIL; a late thread meeting interpreter finalisation aborts the rank (pytorch/pytorch#179291;
    # the aborts we saw: docs/RESULTS.md, "Test suite"). Dropping the trainer and collecting
    # runs the group's destructor now, which drains and joins those threads.
    trainer.accelerator.end_training()
    del trainer
    gc.collect()
    return code


def _start(recipe: str | None, overrides: Sequence[str], resume: str | None,
           stop_at: float | None) -> tuple[Trainer, RunLock]:
    """Validate, lock the run directory, build the trainer. A start that fails removes the run
    directory it created and releases the lock."""
    if recipe is None and resume is None:
        raise ConfigError("no recipe given; pass a YAML recipe (e.g. recipes/quickstart.yaml) "
                          "or --resume RUN_DIR")
    check_launch()
    check_engine()
    stop_with_launcher()
    cfg, run_dir, checkpoint = prepare_run(recipe, overrides, resume)

    def build(run_dir: Path) -> Trainer:
        from ssl_ema.engine.trainer import Trainer  # heavy imports only once the input is valid

        return Trainer(cfg, run_dir, checkpoint, stop_at)

    return locked_start(run_dir, build, new=resume is None)


def locked_start(run_dir: Path, build: Callable[[Path], Trainer],
                 new: bool = False) -> tuple[Trainer, RunLock]:
    """Lock the run directory, then ``build`` the trainer in it. ``new``: a new run, whose
    folder is created, with a suffix where another run took ``run_dir`` first
    (`lock.make_new_dir`). A start that fails removes the run directory it created and
    releases the lock."""
    state = PartialState(cpu=cpu_processes())
    created = new or not run_dir.exists()
    parents = [d for d in run_dir.parents if not d.exists()]  # deepest first
    lock = lock_run_dir(run_dir, state, new)
    try:
        return build(lock.run_dir), lock
    except BaseException:
        lock.release()
        if created and state.is_main_process:
            shutil.rmtree(lock.run_dir, ignore_errors=True)
            for folder in parents:  # <output_dir>/<name>, <output_dir>, if still empty
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise


def own_line(e: Exception) -> str:
    """The error's own message, also when a DataLoader worker raised it: torch re-raises it in
    this process with the worker's traceback as its message, whose last line is
    ``module.Class: message``."""
    text = str(e)
    if "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def _fit(trainer: Trainer) -> tuple[int, str]:
    """Run training; (exit code, the one line to print)."""
    from ssl_ema.engine.trainer import RunFinished

    try:
        result = trainer.fit()
    except (NonFiniteLoss, CheckpointWriteError, SnapshotWriteError) as e:
        return 1, f"error: {e}"
    except ConfigError as e:  # found while training: an unreadable file (data.pipeline=jpeg)
        return 2, f"error: {own_line(e)}"
    except OSError as e:  # the run directory cannot be written (disk full, permissions)
        return 1, (f"error: could not write {e.filename or 'the run directory'}: "
                   f"{e.strerror or e}; free space or make run.output_dir writable")
    except Stopped as e:
        return e.code, str(e)
    except RunFinished as e:
        return 0, str(e)
    table = trainer.evaluation.table(result)
    skipped = int(result.get("skipped_steps", 0))
    if skipped:  # train.nonfinite=skip
        table += (f"\n{skipped} of {int(result['step'])} optimizer steps skipped for a non-finite "
                  "loss (train.nonfinite=skip: no update, no EMA step; 'skipped' in metrics.jsonl)")
    return 0, table
