"""Models that hold the same weights are evaluated once.

Before training the student, the teacher and every EMA copy are the same network, and during the
EMA warm-up ``min(rho, (t+1)/(t+10))`` (Morales-Brotons et al. 2024, Sec. 3) every EMA whose
momentum is above the cap takes the same update, so several EMAs stay equal until the cap passes
their momentum. Comparing tensors costs one read of each model; an evaluation costs passes over
thousands of images per model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether ``a`` and ``b`` hold equal parameters and buffers (in order, bit for bit)."""
    if a is b:
        return True
    pairs = [*zip(a.parameters(), b.parameters()), *zip(a.buffers(), b.buffers())]
    counts = (sum(1 for _ in a.parameters()) + sum(1 for _ in a.buffers()),
              sum(1 for _ in b.parameters()) + sum(1 for _ in b.buffers()))
    if counts[0] != counts[1] or len(pairs) != counts[0]:
        return False
    return all(x.shape == y.shape and torch.equal(x, y) for x, y in pairs)


def representatives(models: Mapping[str, nn.Module]) -> dict[str, str]:
    """Each name -> the first name (in ``models``' order) whose model has the same weights."""
    out: dict[str, str] = {}
    for name, model in models.items():
        out[name] = next((r for r in dict.fromkeys(out.values())
                          if same_weights(models[r], model)), name)
    return out
