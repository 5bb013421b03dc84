"""Non-finite losses: stop before anything corrupt is written, or skip the step (by config).

``train.nonfinite=fail`` keeps the step free of host syncs: the first bad step is recorded on
the device and read back only when something is about to be written (a log line, a checkpoint,
an evaluation), so the run stops there naming that step and nothing after it is written.
``skip`` must decide before the optimizer step, so it costs one host sync per optimizer step.
Under several processes the decision is all-reduced, so every rank takes the same one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ssl_ema.engine.checkpoint import checkpoints


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the checkpoint to use."""


class NonFiniteGuard:
    def __init__(self, deferred: bool,
                 all_reduce_min: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.deferred = deferred
        self._all_reduce_min = all_reduce_min
        self._finite: torch.Tensor | None = None  # this optimizer step's micro-batches
        # deferred: (step, epoch) of the first bad step, +inf while there is none
        self._first_bad: tuple[torch.Tensor, torch.Tensor] | None = None

    def observe(self, loss: torch.Tensor, step: int, epoch: int) -> None:
        """Record one micro-batch's loss at optimizer step ``step`` (1-based); no host sync."""
        ok = torch.isfinite(loss.detach()).all()
        if not self.deferred:
            self._finite = ok if self._finite is None else self._finite & ok
            return
        if self._first_bad is None:
            inf = torch.full((), float("inf"), device=loss.device)
            self._first_bad = (inf, inf.clone())
        first_step, first_epoch = self._first_bad
        new = ~ok & torch.isinf(first_step)  # Python scalars below: no host-to-device copy
        self._first_bad = (torch.where(new, step, first_step), torch.where(new, epoch, first_epoch))

    def state(self) -> tuple[Any, ...]:
        """What `observe` has recorded, for `restore` (its tensors are replaced, never changed
        in place)."""
        return self._finite, self._first_bad

    def restore(self, state: tuple[Any, ...]) -> None:
        """Forget what was observed since `state` (an interrupted step)."""
        self._finite, self._first_bad = state

    def all_finite(self) -> bool:
        """Skip mode: were all losses of this step finite on every process (host sync)?
        Deferred mode: True without looking; `first_nonfinite` tells later."""
        finite, self._finite = self._finite, None
        if self.deferred or finite is None:
            return True
        return self._reduce_min(finite.float()) == 1.0

    def first_nonfinite(self) -> tuple[int, int] | None:
        """Deferred mode: (step, epoch) of the first non-finite loss, if any (host sync)."""
        if self._first_bad is None:
            return None
        step, epoch = (self._reduce_min(t) for t in self._first_bad)
        return None if step == float("inf") else (int(step), int(epoch))

    def check(self, run_dir: Path) -> None:
        """Before anything is written: raise `NonFiniteLoss` if a loss was NaN/inf (deferred
        mode), naming the step and the checkpoint to resume from."""
        bad = self.first_nonfinite()
        if bad is None:
            return
        saved = checkpoints(run_dir)
        skip = (f"resume from {saved[-1].name} dropping such steps: tools/train.py --resume "
                f"{run_dir} train.nonfinite=skip" if saved else
                "no checkpoint was written yet: start again with train.nonfinite=skip")
        raise NonFiniteLoss(
            f"non-finite loss at step {bad[0]} (epoch {bad[1]}); nothing was written after it; "
            f"{skip}; or start a new run with a lower optim.lr"
        )

    def _reduce_min(self, flag: torch.Tensor) -> float:
        if self._all_reduce_min is not None:
            flag = self._all_reduce_min(flag)
        return float(flag.item())
