"""How the engine evaluates a method during training: the method names its evaluation, the
trainer builds an `EvalContext` and runs it (before training, every ``eval.every_epochs`` and at
the end).

- ``knn``: weighted kNN on frozen backbone features of teacher, student and EMA copies (the
  self-supervised methods; `eval.teacher_student`).
- ``classify``: top-1 of the method's own classifier for every model, with and without
  BatchNorm recomputation, and EMA early stopping on a validation split (`eval.classify`).

An evaluation has ``evaluate(epoch, step) -> metrics``, a baseline (the score of the random-init
student before training), JSON state for checkpoints, extra ``summary()`` for results.json, and
the end-of-run ``table`` (`eval.tables`).
"""

from __future__ import annotations

from typing import Any, Protocol

from ssl_ema.eval.classify import ClassifierEvaluation
from ssl_ema.eval.context import EvalContext
from ssl_ema.eval.teacher_student import KNNEvaluation


class Evaluation(Protocol):
    baseline_key: str  # the metric of the random-init student, logged before training ...
    baseline_name: str  # ... and written to results.json under this name

    def evaluate(self, epoch: int, step: int) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def summary(self) -> dict[str, Any]: ...

    def table(self, result: dict[str, Any]) -> str: ...


EVALUATIONS: dict[str, type[Evaluation]] = {"knn": KNNEvaluation,  # type: ignore[dict-item]
                                            "classify": ClassifierEvaluation}


def build_evaluation(ctx: EvalContext) -> Evaluation:
    return EVALUATIONS[ctx.model.evaluation](ctx)  # type: ignore[call-arg]


__all__ = ["EVALUATIONS", "Evaluation", "KNNEvaluation", "ClassifierEvaluation",
           "build_evaluation"]
