"""EMA teachers: teacher <- momentum * teacher + (1 - momentum) * student.

The update runs once per optimizer step (never per micro-batch: under gradient accumulation a
per-micro-batch update silently shortens the averaging horizon), on unwrapped modules, with
`torch._foreach_lerp_` so that all tensors are updated by one fused kernel launch per device
instead of one Python-level op per parameter (lightly's `update_momentum` loops per parameter).

Buffer policy (BatchNorm running statistics), chosen explicitly:
- ``own``:  the teacher keeps the statistics its own forward passes accumulate (BYOL, lightly).
- ``copy``: the teacher's buffers are copied from the student at every update.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

BufferPolicy = Literal["own", "copy"]


def _float_params(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters()]


class EMA:
    """Keeps ``teacher`` an exponential moving average of ``student``.

    Both modules must have the same structure (same parameter order and shapes); the teacher is
    built separately and loaded from the student (see `methods.base`), not deep-copied.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, buffers: BufferPolicy = "own"):
        t_params, s_params = _float_params(teacher), _float_params(student)
        if len(t_params) != len(s_params) or any(
            t.shape != s.shape for t, s in zip(t_params, s_params)
        ):
            raise ValueError("teacher and student must have the same parameters in the same order")
        if buffers not in ("own", "copy"):
            raise ValueError(f"unknown buffer policy '{buffers}'; valid: own, copy")
        self.teacher, self.student, self.buffers = teacher, student, buffers
        self._t_params, self._s_params = t_params, s_params
        self.num_updates = 0

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """One EMA step with the given momentum (already scheduled and scaled by the caller)."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        # lerp_(s, w) computes t + w * (s - t) = momentum * t + (1 - momentum) * s.
        torch._foreach_lerp_(self._t_params, self._s_params, 1.0 - momentum)
        if self.buffers == "copy":
            for t_buf, s_buf in zip(self.teacher.buffers(), self.student.buffers()):
                t_buf.copy_(s_buf)
        self.num_updates += 1

    def state_dict(self) -> dict[str, int]:
        return {"num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.num_updates = int(state["num_updates"])
