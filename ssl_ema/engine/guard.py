"""Non-finite losses: stop before anything corrupt is written, or skip the step (by config).

The check costs one host sync per optimizer step (and one all-reduce under several processes,
so that every rank takes the same decision); micro-batch losses are combined on the device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the checkpoint to use."""


class NonFiniteGuard:
    def __init__(self, all_reduce_min: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self._all_reduce_min = all_reduce_min
        self._finite: torch.Tensor | None = None

    def observe(self, loss: torch.Tensor) -> None:
        """Record one micro-batch's loss (no host sync)."""
        ok = torch.isfinite(loss.detach()).all()
        self._finite = ok if self._finite is None else self._finite & ok

    def all_finite(self) -> bool:
        """Were all losses since the last call finite, on every process? Resets the record."""
        finite, self._finite = self._finite, None
        if finite is None:
            return True
        flag = finite.float()
        if self._all_reduce_min is not None:
            flag = self._all_reduce_min(flag)
        return bool(flag.item() == 1.0)
