"""Frozen-feature extraction, sharded across processes and gathered; an on-disk feature cache."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
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
    """L2-normalised (or raw) features ``(N, D)`` and labels ``(N,)`` of every item of ``loader``.

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


def cached_features(backbone: nn.Module, loader: Iterable[Any], cache: Path | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw features and labels of ``loader`` (one process), read from ``cache`` if it exists.

    Probes are cheap next to the forward passes, so the features of a checkpoint are computed
    once and every protocol (kNN, linear, several weight decays) reuses them. The caller names
    the file after everything the features depend on (checkpoint, role, data, image size).
    """
    from safetensors.torch import load_file, save_file

    if cache is not None and cache.is_file():
        saved = load_file(str(cache), device=str(next(backbone.parameters()).device))
        return saved["features"], saved["labels"]
    feats, labels = extract_features(backbone, loader, normalize=False)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        save_file({"features": feats.cpu().contiguous(), "labels": labels.cpu().contiguous()},
                  str(tmp))
        tmp.replace(cache)  # never leave a half-written cache behind
    return feats, labels
