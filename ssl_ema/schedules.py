"""Schedules as pure functions of training progress.

Progress is a fraction of the total number of *samples* to be seen, never of steps, so that a
change of batch size changes the number of steps and not the dynamics (Busbridge et al. 2023,
Algorithm 1). The only schedule state a checkpoint needs is the samples-seen counter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def cosine(start: float, end: float, progress: float) -> float:
    """Half-cosine from ``start`` (progress 0) to ``end`` (progress 1); clamped outside [0, 1]."""
    p = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))


def warmup_cosine(peak: float, progress: float, warmup: float, end: float = 0.0) -> float:
    """Linear warm-up from 0 to ``peak`` over the first ``warmup`` fraction, then cosine."""
    if warmup > 0 and progress < warmup:
        return peak * progress / warmup
    if warmup >= 1.0:
        return peak
    return cosine(peak, end, (progress - warmup) / (1.0 - warmup))


def batch_at_epoch(epoch: int, batch_size: int, batch_schedule: Sequence[tuple[int, int]]) -> int:
    """Effective batch during ``epoch``: ``batch_size`` until the first ``[epoch, batch]`` switch.

    Progressive scaling (Busbridge et al. 2023, Alg. 1) switches at epoch boundaries, so an epoch
    is one pass at one batch size and samples seen stays the measure of progress.
    """
    batch = batch_size
    for start, b in batch_schedule:
        if epoch >= start:
            batch = b
    return batch
