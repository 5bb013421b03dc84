"""The method interface: student and teacher ModuleDicts with the same keys.

A method is a short `nn.Module` whose ``forward(batch)`` returns a dict with ``loss`` and detached
metrics. Loop, optimizer, EMA and logging live in `ssl_ema.engine` (DINOv2's student/teacher
ModuleDicts; one level of inheritance).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ssl_ema.config_schema import Config
from ssl_ema.models.conv_guard import guard_convs
from ssl_ema.momentum import MomentumRule, scheduled_momentum


class TeacherStudentMethod(nn.Module, ABC):
    """Base class: ``student`` is trained by gradients, ``teacher`` is an EMA of (part of) it.

    ``build_modules`` is called once per role; the teacher is then loaded from the student.
    Building instead of ``copy.deepcopy`` keeps weight-normed heads (DINO) intact.
    ``ema_copies`` are further EMAs of the same student modules at fixed momenta, tracked in
    parallel with the teacher (Morales-Brotons et al. 2024) and evaluated, never trained on.
    """

    student: nn.ModuleDict
    teacher: nn.ModuleDict
    ema_copies: nn.ModuleList
    # How the engine evaluates this method (`ssl_ema.eval.evaluations.EVALUATIONS`): "knn" on
    # frozen backbone features, or "classify" (top-1 of the method's own classifier).
    evaluation: str = "knn"

    def __init__(self, cfg: Config, build_modules: Callable[[], dict[str, nn.Module]],
                 teacher_keys: list[str]):
        super().__init__()
        # Teacher momentum, cosine from method.momentum to method.momentum_end over progress
        # (BYOL, Grill et al. 2020, Sec. 3.2; DINO, MoCo and the model EMAs alike).
        self.momentum_start, self.momentum_end = cfg.method.momentum, cfg.method.momentum_end
        self.student = nn.ModuleDict(build_modules())
        # CPU bf16: oneDNN's weight gradient of a strided conv on a map smaller than the
        # stride is uninitialised memory (torch 2.13-2.15); the guard pads such inputs.
        guard_convs(self.student)

        def averaged_copy() -> nn.ModuleDict:
            built = build_modules()
            copy = nn.ModuleDict({k: built[k] for k in teacher_keys})
            for key in teacher_keys:
                copy[key].load_state_dict(self.student[key].state_dict())
            return copy.requires_grad_(False)

        self.teacher = averaged_copy()
        self.ema_copies = nn.ModuleList(averaged_copy() for _ in cfg.ema.extra_momenta)

    def student_for_ema(self) -> nn.ModuleDict:
        """The student modules the teacher averages, in the teacher's key order."""
        return nn.ModuleDict({k: self.student[k] for k in self.teacher})

    @property
    def student_backbone(self) -> nn.Module:
        return self.student["backbone"]

    @property
    def teacher_backbone(self) -> nn.Module:
        return self.teacher["backbone"]

    def prepare_step(self, progress: float, momentum: MomentumRule) -> None:
        """Called before each forward: set progress-dependent state (temperatures; an EMA
        stepped per forward, as DINO's centre, takes ``momentum.per_forward(base).value``).
        Default: nothing."""

    def before_optimizer_step(self) -> None:
        """Called after gradients are synchronised (and clipped), before the step: e.g. drop
        gradients of frozen layers. Default: nothing."""

    def epoch_metrics(self) -> dict[str, torch.Tensor]:
        """Sums accumulated since the last call (then reset), reported with each evaluation and
        summed over processes, e.g. pseudo-label counts. Default: none."""
        return {}

    def momentum(self, progress: float) -> float:
        """Teacher momentum at training progress in [0, 1] (fraction of samples seen), at the
        reference batch: the engine applies the EMA Scaling Rule and the update period."""
        return scheduled_momentum(self.momentum_start, self.momentum_end, progress)

    @abstractmethod
    def forward(self, batch: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss (with graph) under key ``loss`` plus detached metrics; ``batch`` as
        `ssl_ema.data.batch` describes for the method's views."""
