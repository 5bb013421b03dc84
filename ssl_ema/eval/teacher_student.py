"""kNN evaluation of every model a teacher-student run holds: teacher, student, EMA copies (the
evaluation of the self-supervised methods, BYOL and DINO).

Runs on every process (the kNN bank sharded, the queries gathered), so all ranks must hold the
same models first: BatchNorm statistics are taken from rank 0, as DDP does before each forward.
EMA models can have their BatchNorm statistics recomputed on training images first
(Morales-Brotons et al. 2024).
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from ssl_ema.ema import recompute_batchnorm
from ssl_ema.eval.context import EvalContext
from ssl_ema.eval.distinct import representatives
from ssl_ema.eval.features import extract_features, extract_shard
from ssl_ema.eval.floor import fair_floor
from ssl_ema.eval.knn import knn_accuracy
from ssl_ema.eval.tables import knn_report


def sync_buffers(module: nn.Module, accelerator: Accelerator) -> None:
    """Give every rank rank 0's buffers (each rank's last forward saw only its own shard)."""
    if accelerator.num_processes > 1:
        for buf in module.buffers():
            torch.distributed.broadcast(buf, src=0)


def knn_evaluate(ctx: EvalContext) -> dict[str, float]:
    """Weighted kNN top-1 of every backbone: ``{"knn_teacher": ..., "knn_student": ...}``."""
    acc = ctx.accelerator
    sync_buffers(ctx.model, acc)
    backbones = {role: modules["backbone"] for role, modules in ctx.roles().items()}
    batches = ctx.cfg.ema.recompute_bn_batches
    # Models with the same weights (all before training, EMAs in their warm-up) and the same
    # statistics treatment are recomputed and scored once (`eval.distinct`).
    rep = representatives(backbones)
    kind = {role: (rep[role], bool(batches) and role != "student") for role in backbones}
    first = {k: role for role, k in reversed(kind.items())}  # each kind's first role
    for role, backbone in backbones.items():
        if not kind[role][1]:
            continue
        if first[kind[role]] == role:  # EMA models get their own statistics (ema.py)
            recompute_batchnorm(backbone, ctx.bank, batches, acc.device,
                                lambda x: acc.reduce(x, "mean"))
        else:
            torch._foreach_copy_(list(backbone.buffers()),
                                 list(backbones[first[kind[role]]].buffers()))
    scores = {k: knn_score(backbones[role], ctx) for k, role in first.items()}
    return {f"knn_{role}": scores[kind[role]] for role in backbones}


def knn_score(backbone: nn.Module, ctx: EvalContext) -> float:
    """Weighted kNN top-1 of one backbone's features (bank: training images, queries: test).

    The bank stays sharded: each process embeds and scores its share of the training images,
    and only the queries and each shard's k best candidates are gathered (`eval.knn`)."""
    # Features in fp32, whatever the training precision: bf16 features cost a random-init
    # ResNet-18 several kNN points on CIFAR-10 (docs/RESULTS.md, "BYOL on CIFAR-10: the
    # 200-epoch run").
    acc = ctx.accelerator
    bank, bank_y = extract_shard(backbone, ctx.bank, acc, prepared=ctx.gather)
    query, query_y = extract_features(backbone, ctx.query, acc if ctx.gather else None)
    return knn_accuracy(bank, bank_y, query, query_y, ctx.num_classes, ctx.cfg.eval.knn_k,
                        ctx.cfg.eval.knn_temperature, sharded=acc.num_processes > 1)


def knn_random_calibrated(ctx: EvalContext) -> float:
    """kNN top-1 of the (still random) student backbone with BatchNorm statistics recomputed.

    The fair floor for "did training learn anything": a random network scored with its initial
    statistics (mean 0, var 1) is badly normalised, and any run fixes that within a few steps
    just by forwarding training images; on digits the recomputed floor was above the previous
    quick start's trained teacher (docs/RESULTS.md, "The fair floor: random weights with recomputed
    BatchNorm statistics").
    Statistics come from all bank batches (training images, evaluation transform), or from
    ``ema.recompute_bn_batches`` of them when that is set.
    """
    acc = ctx.accelerator
    floor = fair_floor(ctx.model.student_backbone, ctx.bank,
                       ctx.cfg.ema.recompute_bn_batches or None, acc.device,
                       lambda x: acc.reduce(x, "mean"))
    return knn_score(floor, ctx)


class KNNEvaluation:
    """kNN of every model; before training also the random student with recomputed BatchNorm
    statistics (``knn_random_bn``), the floor a run must beat to have learnt features.

    Also the best score of each model over the evaluations after training started, with its
    epoch (``best["knn_student"] = (accuracy, epoch)``): what lightly's benchmarks report (the
    maximum over per-epoch evaluations), so set ``eval.every_epochs=1`` to compare with them.
    """

    baseline_key, baseline_name = "knn_student", "knn_random"

    def __init__(self, ctx: EvalContext | None):
        self.ctx = ctx
        self.knn_random_bn: float | None = None
        self.best: dict[str, tuple[float, int]] = {}

    def _track_best(self, scores: dict[str, float], epoch: int) -> None:
        for key, value in scores.items():
            if key not in self.best or value > self.best[key][0]:
                self.best[key] = (value, epoch)

    def evaluate(self, epoch: int, step: int) -> dict[str, float]:
        assert self.ctx is not None
        out = knn_evaluate(self.ctx)
        if step == 0 and self.knn_random_bn is None:
            self.knn_random_bn = knn_random_calibrated(self.ctx)
            out["knn_random_bn"] = self.knn_random_bn
        elif step > 0:
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
        assert self.ctx is not None
        return knn_report(result, self.ctx.cfg, self.ctx.held_out["test"], self.ctx.run_dir)
