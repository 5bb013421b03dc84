"""A wall-clock deadline for training (``tools/train.py --stop-after SECONDS``).

A run given a budget (``tools/reproduce.py run --budget``, a pre-emptible GPU lease) must stop
cleanly before the budget ends: the trainer asks at optimizer-step boundaries, writes a
checkpoint and raises :class:`DeadlineReached`; ``tools/train.py --resume`` continues exactly.
The deadline counts from the process's start: start-up (imports, data, compilation) is spent
from the same budget.
Several processes must stop at the same step, so they decide together, and only where they
already synchronise (log steps, evaluations), which keeps training steps free of host syncs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


class DeadlineReached(RuntimeError):
    """Training stopped at the deadline after writing a checkpoint; resume to continue."""


class Deadline:
    """A time on the monotonic clock (``time.monotonic()``); None never comes."""

    def __init__(self, at: float | None,
                 all_reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.at = at
        self._all_reduce_max = all_reduce_max  # several processes: any rank past it stops all

    def passed(self, synchronised: bool) -> bool:
        """Whether the deadline has passed; False off ``synchronised`` points under several
        processes (every rank must reach the same answer at the same step)."""
        if self.at is None or (self._all_reduce_max is not None and not synchronised):
            return False
        due = time.monotonic() >= self.at
        if self._all_reduce_max is not None:
            due = bool(self._all_reduce_max(torch.tensor(float(due))).item() > 0)
        return due
