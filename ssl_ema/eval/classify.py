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

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from ssl_ema.ema import recompute_batchnorm
from ssl_ema.eval.calibration import expected_calibration_error, negative_log_likelihood
from ssl_ema.eval.context import EvalContext
from ssl_ema.eval.distinct import representatives
from ssl_ema.eval.early_stopping import BestModel, Choice
from ssl_ema.eval.features import extract_features
from ssl_ema.eval.tables import classification_table
from ssl_ema.eval.teacher_student import sync_buffers

Variant = tuple[str, bool]  # (model name, BatchNorm statistics recomputed)


def scores_of(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``acc`` (top-1), ``nll``, ``ece`` (15 equal-mass bins) and ``ece100`` (100 bins, as
    Morales-Brotons et al. 2024 report it) of ``logits (N, K)``."""
    logits, labels = logits.float().cpu(), labels.cpu()
    probs = logits.double().softmax(1)
    return {"acc": (logits.argmax(dim=1) == labels).float().mean().item(),
            "nll": negative_log_likelihood(logits, labels),
            "ece": expected_calibration_error(probs, labels, 15),
            "ece100": expected_calibration_error(probs, labels, 100)}


@torch.no_grad()
def classifier_scores(model: nn.Module, loader: Iterable[Any], accelerator: Any
                      ) -> dict[str, float]:
    """``acc``, ``nll`` and ``ece`` of one model over ``loader`` (gathered over processes)."""
    logits, labels = extract_features(model, loader, accelerator, normalize=False)  # (N, K)
    return scores_of(logits, labels)


@torch.no_grad()
def logits_of_all(nets: Mapping[str, nn.Module], buffers: Mapping[Variant, list[torch.Tensor]],
                  loader: Iterable[Any], keep: Callable[[Any], Any] | None = None
                  ) -> dict[Variant, tuple[torch.Tensor, torch.Tensor]]:
    """Logits and labels of every variant in ONE pass over ``loader``: each batch is made (read,
    decoded, moved) once and every model scores it, with each of its buffer sets in turn
    (``buffers[(name, bn)]``, copied into the model's buffers: BatchNorm statistics are a few
    KB, a batch of images is not). ``keep`` drops the padding of a sharded loader."""
    live = {name: list(net.buffers()) for name, net in nets.items()}
    modes = {name: net.training for name, net in nets.items()}
    out: dict[Variant, list[tuple[torch.Tensor, torch.Tensor]]] = {v: [] for v in buffers}
    for net in nets.values():
        net.eval()
    for x, y in loader:
        for variant, values in buffers.items():
            net = nets[variant[0]]
            torch._foreach_copy_(live[variant[0]], values)
            device = next(net.parameters()).device
            pair = (net(x.to(device)).float(), y.to(device))  # (B, K), (B,)
            out[variant].append(keep(pair) if keep else pair)
    for name, net in nets.items():
        net.train(modes[name])
    return {v: (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
            for v, parts in out.items()}


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
        self._predicted: dict[Variant, torch.Tensor] = {}  # the last evaluation's, on test

    def evaluate(self, epoch: int, step: int) -> dict[str, float]:
        ctx, acc = self.ctx, self.ctx.accelerator
        sums = {k: acc.reduce(v.to(acc.device), "sum")
                for k, v in ctx.model.epoch_metrics().items()}
        out: dict[str, float] = pseudo_label_rates(sums)
        sync_buffers(ctx.model, acc)
        roles = ctx.roles()
        nets = {name: nn.Sequential(m["backbone"], m["classifier"]) for name, m in roles.items()}
        # Models with the same weights (all of them before training, EMAs in their warm-up)
        # are scored once; every role still gets its keys and is offered to early stopping.
        rep = representatives(nets)
        distinct = {name: nets[name] for name in dict.fromkeys(rep.values())}
        buffers = self._buffer_sets(distinct)
        keep = acc.gather_for_metrics if ctx.gather else None
        with acc.autocast():
            logits = {split: logits_of_all(distinct, buffers, loader, keep)
                      for split, loader in self.splits.items()}
        scores = {split: {v: scores_of(*pair) for v, pair in by_variant.items()}
                  for split, by_variant in logits.items()}
        self._predicted = {v: pair[0].argmax(1) for v, pair in logits["test"].items()}
        for name, modules in roles.items():
            for bn in (False, True) if ctx.cfg.ema.recompute_bn_batches else (False,):
                # early stopping saves a model with the statistics it was scored with
                torch._foreach_copy_(list(nets[name].buffers()), buffers[(rep[name], bn)])
                self._record(out, (name, bn), rep[name], scores, modules, epoch, step)
            # the statistics each model trains with (duplicates hold the same as their model)
            torch._foreach_copy_(list(nets[name].buffers()), buffers[(rep[name], False)])
        return out

    def _buffer_sets(self, nets: Mapping[str, nn.Module]) -> dict[Variant, list[torch.Tensor]]:
        """Each model's own buffers and, with ``ema.recompute_bn_batches``, its buffers after
        BatchNorm recomputation on training images (computed on the side: the model is left
        holding its own)."""
        ctx, acc = self.ctx, self.ctx.accelerator
        batches = ctx.cfg.ema.recompute_bn_batches
        out: dict[Variant, list[torch.Tensor]] = {}
        for name, net in nets.items():
            own = [b.clone() for b in net.buffers()]
            out[(name, False)] = own
            if batches:
                recompute_batchnorm(net, ctx.bank, batches, acc.device,
                                    lambda x: acc.reduce(x, "mean"))
                out[(name, True)] = [b.clone() for b in net.buffers()]
                torch._foreach_copy_(list(net.buffers()), own)
        return out

    def _record(self, out: dict[str, float], variant: Variant, rep: str,
                scores: dict[str, dict[Variant, dict[str, float]]], modules: nn.ModuleDict,
                epoch: int, step: int) -> None:
        """``variant``'s keys, scored as ``rep`` (the first model with its weights)."""
        (name, bn), scored = variant, (rep, variant[1])
        suffix = "_bn" if bn else ""
        for split, by_variant in scores.items():
            for metric, value in by_variant[scored].items():
                out[f"{metric}_{name}_{split}{suffix}"] = value
        if self.best is not None:
            choice = Choice(name, bn, epoch, step, scores["val"][scored]["acc"],
                            scores["test"][scored]["acc"])
            self.best.offer(choice, modules.state_dict(), self._predicted[scored])

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
