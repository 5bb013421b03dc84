"""Top-1 accuracy and calibration of every model a classification run holds, for the supervised
and pseudo-labelling methods: the student (last iterate), the teacher and each EMA copy, on the
validation split (if any) and the test set, each with the BatchNorm statistics it has and with
statistics recomputed on training images (Morales-Brotons et al. 2024, Sec. 5: an EMA of weights
is a different network from any iterate; recomputing helps and rescues the slowest EMAs).

Besides top-1, each (model, split, BatchNorm variant) gets the NLL and the ECE with 15
equal-mass bins of its own classifier's probabilities (``eval/calibration.py``), from the same
logits: the paper's claim that EMA models are better calibrated is measured during training,
not only by a probe afterwards. Early stopping still chooses on top-1.

Recomputation is done on the side: the statistics a model trains on are restored afterwards, so
an evaluation never changes the run (resume stays exact). The pseudo-labelling epoch metrics
(mask rate, pseudo-label accuracy against the hidden true labels) are reported alongside.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from ssl_ema.ema import recompute_batchnorm
from ssl_ema.eval.calibration import expected_calibration_error, negative_log_likelihood
from ssl_ema.eval.context import EvalContext
from ssl_ema.eval.early_stopping import BestModel, Choice
from ssl_ema.eval.features import extract_features
from ssl_ema.eval.tables import classification_table
from ssl_ema.eval.teacher_student import sync_buffers


@torch.no_grad()
def classifier_scores(model: nn.Module, loader: Iterable[Any], accelerator: Any
                      ) -> dict[str, float]:
    """``acc`` (top-1), ``nll`` and ``ece`` (15 equal-mass bins) of one pass over ``loader``."""
    logits, labels = extract_features(model, loader, accelerator, normalize=False)  # (N, K)
    logits, labels = logits.cpu(), labels.cpu()
    return {"acc": (logits.argmax(dim=1) == labels).float().mean().item(),
            "nll": negative_log_likelihood(logits, labels),
            "ece": expected_calibration_error(logits.double().softmax(1), labels, 15)}


def pseudo_label_rates(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mask rate and pseudo-label accuracy (of the masked, and of all) from summed counts."""
    if not sums or float(sums["pl_seen"]) == 0:
        return {}
    seen, masked = float(sums["pl_seen"]), float(sums["pl_masked"])
    out = {"mask_rate": masked / seen,
           "pseudo_label_accuracy_all": float(sums["pl_correct"]) / seen}
    if masked:  # the accuracy of the pseudo-labels used: undefined while none passes tau
        out["pseudo_label_accuracy"] = float(sums["pl_correct_masked"]) / masked
    return out


class ClassifierEvaluation:
    """Keys ``{acc,nll,ece}_<model>_<split>[_bn]``; tracks the best EMA and epoch on validation
    top-1."""

    baseline_key, baseline_name = "acc_student_test", "random_init_test"

    def __init__(self, ctx: EvalContext):
        self.ctx = ctx
        self.splits: dict[str, Iterable[Any]] = {} if ctx.val is None else {"val": ctx.val}
        self.splits["test"] = ctx.query
        self.best = BestModel(ctx.run_dir, ctx.accelerator.is_main_process) \
            if ctx.val is not None else None

    def _scores(self, net: nn.Module) -> dict[str, dict[str, float]]:
        """split -> {acc, nll, ece}."""
        acc = self.ctx.accelerator
        with acc.autocast():
            return {split: classifier_scores(net, loader, acc)
                    for split, loader in self.splits.items()}

    def evaluate(self, epoch: int, step: int) -> dict[str, float]:
        ctx, acc = self.ctx, self.ctx.accelerator
        sums = {k: acc.reduce(v.to(acc.device), "sum")
                for k, v in ctx.model.epoch_metrics().items()}
        out: dict[str, float] = pseudo_label_rates(sums)
        sync_buffers(ctx.model, acc)
        batches = ctx.cfg.ema.recompute_bn_batches
        for name, modules in ctx.roles().items():
            net = nn.Sequential(modules["backbone"], modules["classifier"])
            self._record(out, name, False, self._scores(net), modules, epoch, step)
            if batches:
                saved = {k: b.clone() for k, b in net.named_buffers()}
                recompute_batchnorm(net, ctx.bank, batches, acc.device,
                                    lambda x: acc.reduce(x, "mean"))
                self._record(out, name, True, self._scores(net), modules, epoch, step)
                for k, b in net.named_buffers():
                    b.copy_(saved[k])
        return out

    def _record(self, out: dict[str, float], name: str, bn: bool,
                scores: dict[str, dict[str, float]], modules: nn.ModuleDict, epoch: int,
                step: int) -> None:
        suffix = "_bn" if bn else ""
        for split, metrics in scores.items():
            for metric, value in metrics.items():
                out[f"{metric}_{name}_{split}{suffix}"] = value
        if self.best is not None:
            choice = Choice(name, bn, epoch, step, scores["val"]["acc"], scores["test"]["acc"])
            self.best.offer(choice, modules.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return self.best.state_dict() if self.best is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.best is not None:
            self.best.load_state_dict(state)

    def summary(self) -> dict[str, Any]:
        if self.best is None:
            return {}
        return {f"best_{kind}": asdict(c) for kind, c in self.best.best.items()}

    def table(self, result: dict[str, Any]) -> str:
        return classification_table(result, self.ctx.cfg, list(self.ctx.roles()),
                                    self.ctx.held_out)
