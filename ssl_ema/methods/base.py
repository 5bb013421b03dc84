"""The method interface: student and teacher ModuleDicts with the same keys.

A method is a short `nn.Module` whose ``forward(batch)`` returns a dict with ``loss`` and detached
metrics. Loop, optimizer, EMA and logging live in `ssl_ema.engine` (DINOv2's student/teacher
ModuleDicts; one level of inheritance).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn


class TeacherStudentMethod(nn.Module, ABC):
    """Base class: ``student`` is trained by gradients, ``teacher`` is an EMA of (part of) it.

    ``build_modules`` is called twice, once per role; the teacher is then loaded from the student.
    Building instead of ``copy.deepcopy`` keeps weight-normed heads (DINO) intact.
    """

    student: nn.ModuleDict
    teacher: nn.ModuleDict

    def __init__(self, build_modules: Callable[[], dict[str, nn.Module]], teacher_keys: list[str]):
        super().__init__()
        self.student = nn.ModuleDict(build_modules())
        teacher = build_modules()
        self.teacher = nn.ModuleDict({k: teacher[k] for k in teacher_keys})
        for key in teacher_keys:
            self.teacher[key].load_state_dict(self.student[key].state_dict())
        self.teacher.requires_grad_(False)

    def student_for_ema(self) -> nn.ModuleDict:
        """The student modules the teacher averages, in the teacher's key order."""
        return nn.ModuleDict({k: self.student[k] for k in self.teacher})

    @property
    def student_backbone(self) -> nn.Module:
        return self.student["backbone"]

    @property
    def teacher_backbone(self) -> nn.Module:
        return self.teacher["backbone"]

    @abstractmethod
    def momentum(self, progress: float) -> float:
        """Teacher momentum at training progress in [0, 1] (fraction of samples seen)."""

    @abstractmethod
    def forward(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """Loss (with graph) under key ``loss`` plus detached metrics."""
