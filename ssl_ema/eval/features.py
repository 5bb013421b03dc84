"""Frozen-feature extraction, sharded across processes and gathered."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn


@torch.no_grad()
def extract_features(
    backbone: nn.Module, loader: Iterable[Any], accelerator: Accelerator | None = None,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features ``(N, D)`` and labels ``(N,)`` of every item of ``loader``
    (``normalize=False``: the outputs as they are, e.g. a classifier's logits).

    The backbone runs in eval mode (BatchNorm running statistics) and is restored to its previous
    mode. With a prepared loader each process embeds its shard; `gather_for_metrics` drops the
    padding Accelerate adds to even out the last batch.
    """
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for x, y in loader:
        if accelerator is None:
            device = next(backbone.parameters()).device
            x, y = x.to(device), y.to(device)
        f = backbone(x).float()  # (B, D)
        f = F.normalize(f, dim=1) if normalize else f
        if accelerator is not None:
            f, y = accelerator.gather_for_metrics((f, y))
        feats.append(f)
        labels.append(y)
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)
