"""What an evaluation during training is given: the models, the loaders, the accelerator and the
recipe (built by `engine.trainer.Trainer.eval_context`; the evaluation never sees the trainer).
Also the one list of the models a run holds, by role."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from accelerate import Accelerator
from torch import nn

from ssl_ema.config import Config
from ssl_ema.methods import TeacherStudentMethod

# Images per batch of every evaluation (kNN bank and queries, classifiers, probes, transfer):
# no gradients are kept, so only memory bounds it. The one place it is written.
EVAL_BATCH = 256


def roles(model: TeacherStudentMethod, extra_momenta: Sequence[float]
          ) -> dict[str, nn.ModuleDict]:
    """Every model of a run by role: ``teacher``, ``student`` (the last iterate) and one
    ``ema_<momentum>`` per EMA copy (``ema.extra_momenta``), in that order."""
    return {"teacher": model.teacher, "student": model.student,
            **{f"ema_{m:g}": cast(nn.ModuleDict, copy)
               for m, copy in zip(extra_momenta, model.ema_copies)}}


@dataclass(frozen=True)
class EvalContext:
    model: TeacherStudentMethod  # unwrapped: student, teacher, ema_copies
    cfg: Config
    accelerator: Accelerator
    bank: Iterable[Any]  # training images, evaluation transform (kNN bank, BatchNorm statistics)
    query: Iterable[Any]  # test images
    val: Iterable[Any] | None  # the validation split of a classification run, if any
    num_classes: int
    # images in each held-out split: "test", and "val" when there is one
    held_out: Mapping[str, int]
    gather: bool  # loaders sharded over processes (False: every process holds all images)
    run_dir: Path  # where EMA early stopping saves the best EMA

    def roles(self) -> dict[str, nn.ModuleDict]:
        return roles(self.model, self.cfg.ema.extra_momenta)
