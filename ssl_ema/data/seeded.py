"""Items of a training or evaluation set: a source's images through a transform, and training
views seeded per sample (so resume and several processes see the same views)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


class Transformed(Dataset):
    """``(image, label)`` source + transform -> ``(*views, label)`` (or ``(x, label)`` for eval)."""

    def __init__(self, source: Any, transform: Callable[[Any], Any]):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        image, label = self.source[i]
        out = self.transform(image)
        if isinstance(out, list | tuple):
            return (*out, label)
        return out, label


class SeededViews(Transformed):
    """Training views whose randomness is a function of (seed, epoch, index) alone.

    Each sample's augmentation runs under its own seed, so it does not depend on which process or
    worker loads it, in what order, or whether the run was resumed mid-epoch (a loader that reads
    one batch ahead, as Accelerate's does, would otherwise leave the checkpointed RNG stream one
    batch off). This is what makes resume exact and a 2-process run see the same views as a
    1-process run. The epoch lives in shared memory so that persistent workers see `set_epoch`.
    """

    def __init__(self, source: Any, transform: Callable[[Any], Any], seed: int):
        super().__init__(source, transform)
        self.seed = seed
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

    def sample_seed(self, i: int) -> int:
        return hash((self.seed, int(self._epoch[0]), i)) % 2**63  # hash of ints: deterministic

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        seed = self.sample_seed(i)
        # torch's CPU generator is restored on exit: the model's own randomness (dropout, drop
        # path) keeps its checkpointed stream. Python's and NumPy's generators serve only
        # transforms (lightly's blur and rotation use NumPy) and are simply re-seeded: restoring
        # NumPy's state would cost 60 us a sample; seeding the CPU generator alone costs 1 us
        # where torch.manual_seed (all devices) costs 100.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            return super().__getitem__(i)
