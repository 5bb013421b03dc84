"""How the engine evaluates a method: the method names its evaluation, the trainer runs it.

- ``knn``: weighted kNN on frozen backbone features of teacher, student and EMA copies (the
  self-supervised methods; `eval.teacher_student`).
- ``classify``: top-1 of the method's own classifier for every model, with and without
  BatchNorm recomputation, and EMA early stopping on a validation split (`eval.classify`).

An evaluation has ``evaluate(epoch) -> metrics``, a baseline (the score of the random-init
student before training), JSON state for checkpoints, extra ``summary()`` for results.json, and
the end-of-run ``table``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from ssl_ema.eval.classify import ClassifierEvaluation
from ssl_ema.eval.teacher_student import knn_evaluate, knn_random_calibrated

if TYPE_CHECKING:
    from ssl_ema.engine.trainer import Trainer


class Evaluation(Protocol):
    baseline_key: str  # the metric of the random-init student, logged before training ...
    baseline_name: str  # ... and written to results.json under this name

    def evaluate(self, epoch: int) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def summary(self) -> dict[str, Any]: ...

    def table(self, result: dict[str, Any]) -> str: ...


class KNNEvaluation:
    """kNN of every model; before training also the random student with recomputed BatchNorm
    statistics (``knn_random_bn``), the floor a run must beat to have learnt features.

    Also the best score of each model over the evaluations after training started, with its
    epoch (``best["knn_student"] = (accuracy, epoch)``): what lightly's benchmarks report (the
    maximum over per-epoch evaluations), so set ``eval.every_epochs=1`` to compare with them.
    """

    baseline_key, baseline_name = "knn_student", "knn_random"

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.knn_random_bn: float | None = None
        self.best: dict[str, tuple[float, int]] = {}

    def _track_best(self, scores: dict[str, float], epoch: int) -> None:
        for key, value in scores.items():
            if key not in self.best or value > self.best[key][0]:
                self.best[key] = (value, epoch)

    def evaluate(self, epoch: int) -> dict[str, float]:
        t = self.trainer
        args = (t.model, t.cfg, t.accelerator, t.bank_loader, t.query_loader, t.data.num_classes)
        out = knn_evaluate(*args, gather=not t.on_device)
        if t.state.step == 0 and self.knn_random_bn is None:
            self.knn_random_bn = knn_random_calibrated(*args, gather=not t.on_device)
            out["knn_random_bn"] = self.knn_random_bn
        elif t.state.step > 0:
            self._track_best(out, epoch)
        return out

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"best": {k: list(v) for k, v in self.best.items()}}
        if self.knn_random_bn is not None:
            state["knn_random_bn"] = self.knn_random_bn
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.knn_random_bn = state.get("knn_random_bn")
        self.best = {k: (float(v[0]), int(v[1])) for k, v in state.get("best", {}).items()}

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.knn_random_bn is None else \
            {"knn_random_bn": self.knn_random_bn}
        for key, (value, epoch) in self.best.items():
            out[f"best_{key}"], out[f"best_{key}_epoch"] = value, epoch
        return out

    def table(self, result: dict[str, Any]) -> str:
        from ssl_ema.engine.report import knn_report

        return knn_report(result, self.trainer)


EVALUATIONS: dict[str, type[Evaluation]] = {"knn": KNNEvaluation,  # type: ignore[dict-item]
                                            "classify": ClassifierEvaluation}


def build_evaluation(trainer: Trainer) -> Evaluation:
    return EVALUATIONS[trainer.model.evaluation](trainer)
