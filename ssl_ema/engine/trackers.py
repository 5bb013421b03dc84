"""Experiment trackers (``run.log_with``): Accelerate's TensorBoard, Weights & Biases, MLflow, ...
mirror what the run writes to ``metrics.jsonl``, which stays the record (resume, tools, tables).

Accelerate creates and feeds the trackers on the main process only (``init_trackers`` and ``log``
are ``on_main_process``); file-based ones (TensorBoard) write under the run directory, given to
the `Accelerator` as ``project_dir``. Each JSONL record's numbers are logged at its ``step`` as
``<event>/<key>`` (``train/loss``, ``eval/knn_teacher``), so the two never disagree.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from ssl_ema.config import Config, to_dict
from ssl_ema.engine.run import flatten

# Events whose numbers are not metrics: the header goes to the trackers as the run's config.
UNLOGGED_EVENTS = {"header"}


def start_trackers(accelerator: Accelerator, cfg: Config, run_dir: Path) -> None:
    """Start ``run.log_with``'s trackers, named after the run, with the flat resolved config as
    their hyperparameters (scalars as they are, lists as text: TensorBoard's hparams take
    scalars only)."""
    if not cfg.run.log_with:
        return
    config = {k: v if isinstance(v, bool | int | float | str) else str(v)
              for k, v in flatten(to_dict(cfg)).items()}
    # The run's own name (its timestamp) where a tracker takes one; W&B's files under the run.
    own = {"wandb": {"dir": str(run_dir), "name": run_dir.name},
           "mlflow": {"run_name": run_dir.name}}
    try:
        accelerator.init_trackers(cfg.run.name or run_dir.parent.name or "run", config=config,
                                  init_kwargs={k: v for k, v in own.items()
                                               if k in cfg.run.log_with})
    except BaseException:
        # Accelerate lists a tracker before starting it, so one that failed to start (its log
        # folder unwritable) would fail again in `end_training`, whose `finish` needs what
        # `start` did not create: finish what can be finished, then forget them all.
        for tracker in accelerator.trackers:
            with contextlib.suppress(Exception):
                tracker.finish()
        accelerator.trackers = []
        raise


def tracker_values(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl record, keyed ``<event>/<key>`` (step aside)."""
    event = record.get("event", "")
    if event in UNLOGGED_EVENTS:
        return {}
    return {f"{event}/{k}": float(v) for k, v in record.items()
            if k not in ("event", "step") and isinstance(v, int | float)
            and not isinstance(v, bool)}


class TrackerMirror:
    """Called with each record `MetricsLog` writes: the same numbers to the trackers."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator

    def __call__(self, record: dict[str, Any]) -> None:
        values = tracker_values(record)
        if values:
            self.accelerator.log(values, step=int(record.get("step", 0)))
