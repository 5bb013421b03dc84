"""The loaders of a run: each effective batch split over processes and accumulation, one training
loader per batch size of ``train.batch_schedule``, and the evaluation loaders."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from ssl_ema.config import Config, ConfigError
from ssl_ema.data import DataBundle

EVAL_BATCH = 256


def per_device_batch(cfg: Config, world_size: int, batch: int | None = None) -> int:
    """Split an effective batch over processes and accumulation; error if it does not divide."""
    batch = cfg.train.batch_size if batch is None else batch
    div = world_size * cfg.train.grad_accumulation
    if batch % div:
        raise ConfigError(
            f"effective batch {batch} is not divisible by world size {world_size} "
            f"x train.grad_accumulation {cfg.train.grad_accumulation}; pick a multiple of {div}"
        )
    return batch // div


def build_loaders(data: DataBundle, cfg: Config, per_device: Mapping[int, int]
                  ) -> tuple[list[DataLoader], DataLoader, DataLoader]:
    """(a training loader per effective batch, in ``per_device``'s order; the bank loader of
    training images with the evaluation transform; the query loader of test images)."""
    workers = cfg.data.num_workers
    common: dict[str, Any] = {"num_workers": workers, "persistent_workers": workers > 0,
                              "pin_memory": torch.cuda.is_available()}
    train = []
    for b, per_device_b in per_device.items():
        loader = DataLoader(data.train, batch_size=per_device_b, shuffle=True, drop_last=True,
                            **common)
        if len(loader) == 0:
            raise ConfigError(
                f"batch {b} exceeds the {len(data.train)} training images; lower it"  # type: ignore[arg-type]
            )
        train.append(loader)
    bank = DataLoader(data.train_eval, batch_size=EVAL_BATCH, **common)
    query = DataLoader(data.test_eval, batch_size=EVAL_BATCH, **common)
    return train, bank, query


def val_loader(data: DataBundle, cfg: Config) -> DataLoader | None:
    """The validation split of a classification run (EMA early stopping), if it has one."""
    if data.val_eval is None:
        return None
    return DataLoader(data.val_eval, batch_size=EVAL_BATCH, num_workers=cfg.data.num_workers)
