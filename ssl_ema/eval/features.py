"""Frozen-feature extraction, sharded across processes and gathered (or kept sharded: each
process its own share, as the kNN bank); an on-disk feature cache."""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
    if accelerator is None:
        return _embed(backbone, loader, normalize)
    return _embed(backbone, loader, normalize, keep=accelerator.gather_for_metrics)


@torch.no_grad()
def extract_shard(
    backbone: nn.Module, loader: Iterable[Any], accelerator: Accelerator, prepared: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's share of the L2-normalised features and labels of ``loader``, without
    communication: the shares of all processes are the data set, each item once.

    ``prepared``: the loader is sharded by ``accelerator.prepare`` (each process sees its own
    batches). Its last batches are padded with items from the start so that every process gets a
    full one, and `gather_for_metrics` keeps the first ``remainder`` rows of the processes' last
    batches in rank order; this process keeps the rows of its batch that fall among them.
    Otherwise every process sees every batch and embeds its own contiguous part of each.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    state = accelerator.gradient_state

    def unpadded(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        f, y = batch
        if state.end_of_dataloader and state.remainder > 0:
            rows = max(0, min(len(f), state.remainder - rank * len(f)))
            f, y = f[:rows], y[:rows]
        return f, y

    if prepared:
        return _embed(backbone, loader, True, keep=unpadded)
    parts = ((x.tensor_split(world)[rank], y.tensor_split(world)[rank]) for x, y in loader)
    return _embed(backbone, parts, True)


def _embed(backbone: nn.Module, loader: Iterable[Any], normalize: bool,
           keep: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] | None = None,
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (eval mode, fp32, optionally L2-normalised) and labels of ``loader``'s batches,
    each passed through ``keep((features, labels))``; ``(0, 0)`` features when no batch has rows."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    feats, labels = [], []
    for x, y in loader:
        if len(x) == 0:
            continue
        f = backbone(x.to(device)).float()  # (B, D)
        f = F.normalize(f, dim=1) if normalize else f
        f, y = keep((f, y.to(device))) if keep else (f, y.to(device))
        feats.append(f)
        labels.append(y)
    backbone.train(was_training)
    if not feats:
        return torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.long, device=device)
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
