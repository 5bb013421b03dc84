"""The fair floor: random weights with BatchNorm statistics recomputed on the training images.

A random network scored with its initial statistics (mean 0, variance 1) is badly normalised,
and any training run fixes that within a few steps just by forwarding images; so "did training
learn features" is asked against the same architecture, random, merely normalised on the data it
is scored on (docs/RESULTS.md, "The fair floor: random weights with recomputed BatchNorm
statistics"). Used before training (`teacher_student.knn_random_calibrated`) and on downstream
data sets (`tools/transfer.py`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ssl_ema.ema import recompute_batchnorm


def fair_floor(random_backbone: nn.Module, batches: Iterable[Any], num_batches: int | None = None,
               device: torch.device | None = None,
               all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None
               ) -> nn.Module:
    """A copy of ``random_backbone`` whose BatchNorm statistics are recomputed on ``batches``
    (the first tensor of each is the input; ``num_batches``: None = all), the original untouched.
    A network without BatchNorm is returned as a plain copy."""
    floor = copy.deepcopy(random_backbone)
    recompute_batchnorm(floor, batches, num_batches, device, all_reduce_mean)
    return floor
